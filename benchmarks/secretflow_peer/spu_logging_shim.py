# Loaded at interpreter start-up through a .pth file in the peer venv (see INSTALL.md).
# secretflow 1.13.0b0 was built against spu==0.9.4.dev20250618, which is no longer on the index; the
# released spu 0.9.5 (the newest whose jax pin, <=0.4.34, fits secretflow's jax<=0.4.26) keeps the same
# logging bindings in spu.libspu.logging but does not re-export them as spu.logging, which secretflow
# evaluates in a default argument at import time. This alias is the only code change made to the peer.
try:
    import spu
    if not hasattr(spu, "logging"):
        spu.logging = spu.libspu.logging
except Exception:
    pass
