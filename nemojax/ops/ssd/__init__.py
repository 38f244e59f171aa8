from nemojax.ops.ssd.api import IMPLEMENTATIONS, default_implementation, ssd, ssd_step
from nemojax.ops.ssd.pallas_ssd import SsdConfig

__all__ = ["IMPLEMENTATIONS", "SsdConfig", "default_implementation", "ssd", "ssd_step"]
