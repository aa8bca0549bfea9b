"""Merge kernels: pure functions over stacked task vectors, registered by name with their paper and parameters.

Every kernel has the signature ``fn(task_tensors [T, *shape], weights [T], *, generator=None, **params) -> [*shape]``
and returns the merged delta; the caller applies ``theta = theta_0 + scaling * delta``. Adding a method: one new file
that decorates its kernel with ``@register_merge_method(...)``, and one import line below.
"""

# Importing a kernel module registers its methods.
from . import adamerging as _adamerging  # noqa: F401
from . import average as _average  # noqa: F401
from . import breadcrumbs as _breadcrumbs  # noqa: F401
from . import cart as _cart  # noqa: F401
from . import dare as _dare  # noqa: F401
from . import dv_basi as _dv_basi  # noqa: F401
from . import fisher as _fisher  # noqa: F401
from . import iso as _iso  # noqa: F401
from . import magnitude_prune as _magnitude_prune  # noqa: F401
from . import regmean as _regmean  # noqa: F401
from . import sta as _sta  # noqa: F401
from . import task_arithmetic as _task_arithmetic  # noqa: F401
from . import ties as _ties  # noqa: F401
from . import tsv as _tsv  # noqa: F401
from . import wudi as _wudi  # noqa: F401
from .registry import MergeMethod, Parameter, get_merge_method, list_merge_methods, register_merge_method

__all__ = ["MergeMethod", "Parameter", "get_merge_method", "list_merge_methods", "register_merge_method"]
