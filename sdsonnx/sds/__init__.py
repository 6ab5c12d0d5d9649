"""SDS math (paper Sec. 2.2-2.3) as pure functions of tensors: re-dense (Eq. 4), soft-mask adjust (Eq. 5), second prune."""
from .adjust import satisfies_pattern, soft_mask_adjust
from .objective import eq4_objective, eq4_smooth_gradient, layer_lambdas, reconstruction_loss, redense_objective
from .redense import redense_gram, redense_sgd
from .second_prune import second_prune

__all__ = ["eq4_objective", "eq4_smooth_gradient", "layer_lambdas", "reconstruction_loss", "redense_gram",
           "redense_objective", "redense_sgd", "satisfies_pattern", "second_prune", "soft_mask_adjust"]
