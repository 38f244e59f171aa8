"""FFN Fusion and full-block parallelisation: the dependency matrix between layers and the residual
statistics (`dependency`), and the choice of what to fuse from them (`plan`)."""

from nemojax.compress.fusion.dependency import dependency_matrix, plot_dependency, residual_stats
from nemojax.compress.fusion.plan import block_windows, ffn_runs
