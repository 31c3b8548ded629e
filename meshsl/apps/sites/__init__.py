"""Sites and jobs: long-running per-party agents, a broker they dial out to, signed jobs each site reviews
against its own policy, and provisioned start-up kits (docs/sites.md)."""
