"""Neural tangent kernel spectral toolkit (analytic kernels and their spectra on the sphere)."""

from nemojax.ntk.kernels import (fc_nngp, fc_nngp_dot, fc_ntk, fc_ntk_dot, gamma_exponential, kappa0, kappa1,
                                 laplace)
from nemojax.ntk.spectra import gegenbauer, multiplicity, zonal_spectrum

__all__ = ["fc_nngp", "fc_nngp_dot", "fc_ntk", "fc_ntk_dot", "gamma_exponential", "gegenbauer", "kappa0",
           "kappa1", "laplace", "multiplicity", "zonal_spectrum"]
from nemojax.ntk.resnet import resnet_nngp, resnet_ntk  # noqa: E402

__all__ += ["resnet_nngp", "resnet_ntk"]
