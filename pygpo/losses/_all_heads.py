"""Imports every module that registers keys, in LOSSES.md section order."""

from . import reducers  # noqa: F401  section 1
from . import pairwise, pairwise_side  # noqa: F401  section 2
from . import token_kl  # noqa: F401  section 3
from . import reference_free  # noqa: F401  section 4
from . import regularizers  # noqa: F401  section 5
from . import unpaired  # noqa: F401  section 6
from . import multi_response  # noqa: F401  section 7
from . import batch_level  # noqa: F401  section 8
from . import stateful  # noqa: F401  state classes attach to their specs
