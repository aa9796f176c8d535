"""The farm file (DESIGN §7): pools and servers, validated with line numbers, applied idempotently.

`load` parses and checks a file (its pools in `pools`, YAML nodes read by `reader`) into a `model.Farm`;
`apply` makes the database match it, and `plan` words the changes as the file does.
"""

from rdbroker_broker.farm.apply import apply_caller, apply_farm
from rdbroker_broker.farm.load import load_farm
from rdbroker_broker.farm.model import Farm, FarmError
from rdbroker_broker.farm.plan import pool_changes, show_power
from rdbroker_broker.farm.reader import parse_duration, parse_probe_ms

__all__ = [
    "Farm",
    "FarmError",
    "apply_caller",
    "apply_farm",
    "load_farm",
    "parse_duration",
    "parse_probe_ms",
    "pool_changes",
    "show_power",
]
