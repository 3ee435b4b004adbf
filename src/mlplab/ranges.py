"""Value ranges in the signatures: jsonargparse refuses an out-of-range setting while it parses
the config, before anything is built or started, and `--help` names the range."""

from __future__ import annotations

import math

from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

#: a batch size; 0 is the whole split
BatchSize = NonNegativeInt
#: a layer's width, a number of channels or batches
Width = PositiveInt
#: a dropout rate: 0 keeps every unit, 1 would drop them all
Probability = restricted_number_type("Probability", float, [(">=", 0.0), ("<", 1.0)])
#: a learning rate: positive and finite
LearningRate = restricted_number_type("LearningRate", float, [(">", 0.0), ("<", math.inf)])
