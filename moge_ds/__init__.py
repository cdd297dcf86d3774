"""moge-ds: Mixture-of-Group-Experts on DeepSpeed-MoE."""

from moge_ds.topographic import SigmaSchedule, default_map_shape, gaussian_kernel, group_sparsity_loss

__all__ = ["MoGE", "MoGEGate", "SigmaSchedule", "default_map_shape", "gaussian_kernel", "group_sparsity_loss"]


def __getattr__(name: str):
    # The DeepSpeed-backed classes are imported on first use so that the pure-torch maths
    # stays importable (and fast to import) without DeepSpeed.
    if name == "MoGE":
        from moge_ds.layer import MoGE
        return MoGE
    if name == "MoGEGate":
        from moge_ds.gate import MoGEGate
        return MoGEGate
    raise AttributeError(f"module 'moge_ds' has no attribute {name!r}")
