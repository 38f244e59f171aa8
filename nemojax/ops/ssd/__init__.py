from nemojax.ops.ssd.api import IMPLEMENTATIONS, ssd, ssd_step

__all__ = ["IMPLEMENTATIONS", "ssd", "ssd_step"]
