"""The documents of sites and jobs: a project (what `meshsl provision` reads), a site's policy, and a job."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSite(Strict):
    name: str = Field(pattern=NAME)
    party: str = Field(pattern=NAME, description="the party (organisation) of the topology nodes this site runs")
    identity: str = Field(description="the site's public identity file (`meshsl site init` prints where), "
                                      "relative to the project file")
    inbound: bool = Field(default=True, description="false: the site accepts no inbound connection (it dials out)")


class ProjectSubmitter(Strict):
    name: str = Field(pattern=NAME)
    identity: str = Field(description="the submitter's public identity file, relative to the project file")


class BrokerSpec(Strict):
    site: str = Field(pattern=NAME, description="the site that hosts the broker (uses that site's keys)")
    endpoint: str = Field(description="where sites and submitters dial the broker, e.g. tcp://lab:7100")
    bind: Optional[str] = Field(default=None, description="where the broker binds (default: every interface, at the endpoint's port)")


class ProjectSpec(Strict):
    name: str = Field(pattern=NAME)
    broker: BrokerSpec
    sites: list[ProjectSite] = Field(min_length=1)
    submitters: list[ProjectSubmitter] = Field(min_length=1)
    image: str = Field(default="localhost/meshsl:latest", description="container image in the kits' compose files")


class SourceRule(Strict):
    forbid_columns: list[str] = Field(default_factory=list, description="columns no job may read")
    segments: Optional[list[str]] = Field(default=None, description="only these segments may read the source "
                                                                   "(default: any segment on this site)")


class PolicySpec(Strict):
    """What a site lets a job do with its data. Unlisted means refused."""

    parties: list[str] = Field(default_factory=list, description="parties this site will train with "
                                                                 "(besides its own)")
    submitters: Optional[list[str]] = Field(default=None, description="default: every submitter of the kit")
    sources: dict[str, SourceRule] = Field(default_factory=dict, description="catalogue entries a job may use")
    labels_may_leave: bool = Field(
        default=False, description="false: the gradients this site sends back (which reveal its labels) must carry "
                                   "a gradient defence, or the job label DP (labels themselves never leave)")
    max_epsilon: Optional[float] = Field(default=None, gt=0, description="largest DP epsilon spent on our data "
                                                                        "(unset: no DP required)")
    required_defences: list[Literal["nopeek", "dp", "gradient"]] = Field(
        default_factory=list, description="each cut edge leaving this site must carry these")
    max_runtime_s: float = Field(default=3600.0, gt=0, description="a job running longer is stopped")
    max_steps: Optional[int] = Field(default=None, ge=1)
    approval: Literal["auto", "operator"] = Field(default="auto", description="operator: `meshsl site approve`")
    release: list[Literal["metrics", "logs"]] = Field(default_factory=lambda: ["metrics"],  # type: ignore[arg-type]
                                                      description="what the submitter receives from this site")


class JobDocument(Strict):
    """A job as signed: its topology (YAML text) and who submitted it."""

    id: str = Field(pattern=r"^[a-z0-9-]{8,64}$")
    name: str = Field(max_length=200)
    topology: str = Field(max_length=4_000_000)
    submitter: str = Field(pattern=NAME)
    submitted_at: float
    signature: str = ""

    def signed_part(self) -> dict:
        return self.model_dump(exclude={"signature"})
