"""FFN Fusion and full-block parallelisation: the dependency matrix between layers and the residual
statistics (`dependency`), the choice of what to fuse from them (`plan`), and the surgery (`fuse`)."""

from nemojax.compress.fusion.dependency import dependency_matrix, plot_dependency, residual_stats
from nemojax.compress.fusion.fuse import fuse, parallelize
from nemojax.compress.fusion.plan import block_windows, ffn_runs

__all__ = ["block_windows", "dependency_matrix", "ffn_runs", "fuse", "parallelize", "plot_dependency",
           "residual_stats"]
