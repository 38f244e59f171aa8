"""Neural tangent kernel toolkit: analytic kernels, their spectra on the sphere, residual-block
replacements and training-free predictions of their damage, empirical NTKs and kernel-regime training
dynamics."""

from nemojax.ntk.dynamics import (empirical_ntk, empirical_ntk_nnx, gd_residuals, iterations_to_fit,
                                  lazy_gd_prediction, msk, pgd_preconditioner)
from nemojax.ntk.kernels import (fc_nngp, fc_nngp_dot, fc_ntk, fc_ntk_dot, gamma_exponential, kappa0, kappa1,
                                 laplace)
from nemojax.ntk.predict import alpha_law, lm_empirical_ntk, surgery_change
from nemojax.ntk.replacement import candidate_replacements, kernel_change, replacement_effects, resnet_ntk_dot
from nemojax.ntk.resmlp import resmlp_apply, resmlp_init, surgery_spec
from nemojax.ntk.resnet import block_ops, resnet_cross_kernels, resnet_nngp, resnet_ntk
from nemojax.ntk.spectra import gegenbauer, multiplicity, zonal_spectrum

__all__ = ["alpha_law", "block_ops", "candidate_replacements", "empirical_ntk", "empirical_ntk_nnx", "fc_nngp",
           "fc_nngp_dot", "fc_ntk", "fc_ntk_dot", "gamma_exponential", "gd_residuals", "gegenbauer", "iterations_to_fit",
           "kappa0", "kappa1", "kernel_change", "laplace", "lazy_gd_prediction", "lm_empirical_ntk", "msk",
           "multiplicity", "pgd_preconditioner", "replacement_effects", "resmlp_apply", "resmlp_init",
           "resnet_cross_kernels", "resnet_nngp", "resnet_ntk", "resnet_ntk_dot", "surgery_change", "surgery_spec",
           "zonal_spectrum"]
