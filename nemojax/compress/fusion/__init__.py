"""FFN Fusion and full-block parallelisation: the choice of what to fuse from a dependency matrix (`plan`)."""

from nemojax.compress.fusion.plan import block_windows, ffn_runs
