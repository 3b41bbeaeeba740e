"""Per-example loss inputs read from dataset columns (TODO's ``ties``, ODPO's ``scores``, MaPPO's
``rewards``, Omni-DPO's ``quality``, ...).

A loss input is taken from the data when the registry declares it per example, ``(B,)`` or
``(B, 2, ...)``: a row carries it as a column of the same name (a number or bool, or a list
``[chosen, rejected]``). Inputs the fused pass supplies itself (lengths, masks, token KL,
``log sum p^2``), batch-level ones (scalars, generators) and the desirable flags of unpaired heads
(a pair's chosen response is desirable, its rejected one is not) are not read from rows.

:class:`ExampleInputs` checks every row's values when the data is loaded, so a bad value is an error
naming the row (or a skipped row) rather than a failure in the middle of training:

* shape: the declared shape without its batch axis, with ``K = 2`` (every example of ``pygpo train``
  is a pair): ``(B,)`` is one number, ``(B, 2)`` / ``(B, K)`` a list ``[chosen, rejected]``,
  ``(B, M)`` a list of ``M`` numbers, ``M`` taken from the first row that has the column and then
  the same in every row (a batch stacks them);
* type: ``float`` inputs are finite numbers, ``int`` inputs integers, ``bool`` inputs ``true``/
  ``false`` (or 0/1);
* value: the loss head's own input check (``spec.extra["check"]``: ODPO's ``s_w > s_l``,
  ``groups < num_groups``, probabilities in ``[0, 1]``, ...), run on the row with the run's
  hyper-parameters;
* presence: an optional column is either in every row or in none (the first row decides).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..fused.inputs import AUTO_INPUTS

PAIR = 2  # responses per example in pygpo train: [chosen, rejected]


class ColumnError(ValueError):
    """A row's value of a loss-input column that does not fit the loss: ``column``, a ``reason`` key
    (``wrong_type``, ``wrong_shape``, ``out_of_range``, ``missing_field``) and a ``detail``."""

    def __init__(self, column: str, reason: str, detail: str):
        self.column, self.reason, self.detail = column, reason, detail
        super().__init__(f"{column}: {detail}")


def _is_row_input(spec: Any, item: Any) -> bool:
    """Whether the input ``item`` of ``spec`` is read from a dataset column (see the module docstring)."""
    if spec.kind == "unpaired" and item.name == "labels":
        return False  # desirable / undesirable comes from chosen / rejected
    per_example = item.shapes and all(len(s) >= 1 and s[0] == "B" and "T" not in s for s in item.shapes)
    return bool(per_example) and item.name not in AUTO_INPUTS and item.dtype != "object"


def example_input_fields(loss_keys: Sequence[str]) -> dict[str, bool]:
    """``{column: required}`` of the per-example inputs of the loss components ``loss_keys``."""
    from ..losses import get

    fields: dict[str, bool] = {}
    for key in loss_keys:
        spec = get(key)
        for item in spec.inputs:
            if _is_row_input(spec, item):
                fields[item.name] = fields.get(item.name, False) or item.required
    return fields


# -- one value against one declared shape -----------------------------------------------------------------


def _row_shape(shape: tuple) -> tuple:
    """A declared shape without its batch axis, ``K`` read as a pair: ``("B", "K")`` -> ``(2,)``."""
    return tuple(PAIR if s == "K" else s for s in shape[1:])


def _describe(shape: tuple, dtype: str, bound: Mapping[str, int]) -> str:
    """``(2,)`` -> ``"a list [chosen, rejected] of 2 numbers"``, in words, for error messages."""
    item = {"float": "number", "int": "integer", "bool": "bool"}[dtype]
    if not shape:
        return f"a{'n' if item[0] in 'aeiou' else ''} {item}"
    inner = f"{item}s"
    for dim in reversed(shape[1:]):
        inner = f"lists of {_size(dim, bound)} {inner}"
    head = shape[0]
    pair = " [chosen, rejected]" if head == PAIR and len(shape) == 1 else ""
    return f"a list{pair} of {_size(head, bound)} {inner}"


def _size(dim: Any, bound: Mapping[str, int]) -> str:
    if isinstance(dim, int):
        return str(dim)
    return f"{dim} = {bound[dim]} (as in the rows before)" if dim in bound else dim


def _scalar(value: Any, dtype: str) -> Any:
    """``value`` as the Python number of ``dtype``: ``ValueError`` for a list (a shape problem),
    ``TypeError`` for a value of another type, ``ArithmeticError`` for a non-finite float."""
    if isinstance(value, (list, tuple)):
        raise ValueError
    if dtype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Real) and value in (0, 1):
            return bool(value)
        raise TypeError
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    if dtype == "int":
        if isinstance(value, numbers.Integral):
            return int(value)
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise TypeError
    if not math.isfinite(value):
        raise ArithmeticError
    return float(value)


def _match(value: Any, shape: tuple, dtype: str, bound: dict[str, int]) -> Any:
    """``value`` normalised to nested lists of ``dtype`` numbers of ``shape``, binding symbols in
    ``bound``; ``ValueError`` if its shape does not fit, ``TypeError`` if an entry is of another type,
    ``ArithmeticError`` for a non-finite number."""
    if not shape:
        return _scalar(value, dtype)
    if not isinstance(value, (list, tuple)):
        if isinstance(value, numbers.Real):
            raise ValueError  # a number where a list belongs
        raise TypeError
    dim = shape[0]
    if isinstance(dim, int) or dim in bound:
        if len(value) != (dim if isinstance(dim, int) else bound[dim]):
            raise ValueError
    elif value:
        bound[dim] = len(value)
    else:
        raise ValueError  # an empty list binds nothing a batch could stack
    return [_match(v, shape[1:], dtype, bound) for v in value]


# -- the columns of a loss ---------------------------------------------------------------------------------


class ExampleInputs:
    """Reads the per-example loss inputs of rows for the loss components ``loss_keys`` and checks them
    (module docstring); one instance serves every file of a run, so the sizes bound by the first row
    (``M``, ...) and the presence of optional columns hold across training and held-out data.

    ``hparams``: each component's hyper-parameters (``{key: {name: value}}``, defaults where absent),
    which some value checks depend on (``num_groups``, ODPO's ``offset``).
    """

    def __init__(self, loss_keys: Sequence[str], hparams: Optional[Mapping[str, Mapping[str, Any]]] = None):
        from ..losses import get
        from ..losses.validation import resolve_hparams

        self.components = {k: get(k) for k in loss_keys}
        self.hparams = {k: resolve_hparams(s, dict((hparams or {}).get(k, {}))) for k, s in self.components.items()}
        self.fields = example_input_fields(loss_keys)
        self._bound: dict[str, dict[str, int]] = {k: {} for k in self.components}
        self._present: dict[str, bool] = {}  # optional column -> given in the first row read

    def __bool__(self) -> bool:
        return bool(self.fields)

    def read(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row's loss inputs, normalised (floats, ints, bools, lists of them); raises
        :class:`ColumnError` naming the column. A row that passes fixes the sizes and optional
        columns the following rows must match."""
        values: dict[str, Any] = {}
        for name, required in self.fields.items():
            value = row.get(name)
            given = value is not None
            if required and not given:
                raise ColumnError(name, "missing_field", f"missing field {name!r} (a per-example input of the loss)")
            if not required and self._present.get(name, given) != given:
                where = "absent here but given" if self._present[name] else "given here but absent"
                raise ColumnError(name, "missing_field" if self._present[name] else "unexpected_field",
                                  f"the optional column {name!r} is {where} in the rows before; give it in every "
                                  "row or in none")
            if given:
                values[name] = value
        bound = {k: dict(v) for k, v in self._bound.items()}
        out = {name: self._column(name, value, bound) for name, value in values.items()}
        self._check_values(out)
        self._bound = bound
        for name, required in self.fields.items():
            if not required:
                self._present.setdefault(name, name in out)
        return out

    def _column(self, name: str, value: Any, bound: dict[str, dict[str, int]]) -> Any:
        """``value`` of column ``name`` checked against every component that declares it."""
        normalised = None
        for key, spec in self.components.items():
            if name not in spec.input_names or not _is_row_input(spec, spec.input(name)):
                continue
            item = spec.input(name)
            shapes = [_row_shape(s) for s in item.shapes]
            reason = "wrong_shape"
            for shape in shapes:
                trial = dict(bound[key])
                try:
                    got = _match(value, shape, item.dtype, trial)
                except ValueError:
                    continue
                except TypeError:
                    reason = "wrong_type"
                    continue
                except ArithmeticError:
                    raise ColumnError(name, "out_of_range", f"expected finite numbers, got {show_value(value)}") from None
                bound[key] = trial
                normalised = got if normalised is None else normalised
                break
            else:
                want = " or ".join(_describe(s, item.dtype, bound[key]) for s in shapes)
                raise ColumnError(name, reason, f"expected {want} ({spec.key}: {item.doc}), got {show_value(value)}")
        return normalised

    def _check_values(self, values: Mapping[str, Any]) -> None:
        """Each component's own input check (``spec.extra["check"]``) on this row as a batch of one."""
        from ..losses.errors import HyperParameterError, InputShapeError, InputValueError, MissingInputError

        for key, spec in self.components.items():
            check = spec.extra.get("check")
            mine = {n: v for n, v in values.items() if n in spec.input_names}
            if check is None or not mine:
                continue
            inputs = {n: _as_tensor(v, spec.input(n).dtype) for n, v in mine.items()}
            policy = torch.zeros(1, PAIR, dtype=torch.float64)  # no check of a row input reads the scores
            try:
                check(spec, inputs, self.hparams[key], policy)
            except (InputValueError, InputShapeError, HyperParameterError) as exc:
                column = next((n for n in mine if n in str(exc)), next(iter(mine)))
                detail = str(exc).split("; violated at example")[0]
                raise ColumnError(column, "out_of_range", f"{detail}, got {show_value(mine[column])}") from None
            except (KeyError, MissingInputError):
                continue  # the check needs inputs only a training step has; it runs there


def show_value(value: Any) -> str:
    """``value``'s type and (shortened) repr, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _as_tensor(value: Any, dtype: str) -> Tensor:
    """One row's value as a batch of one, in the dtype the loss validation gives the input."""
    kind = {"float": torch.float64, "int": torch.long, "bool": torch.bool}[dtype]
    return torch.tensor([value], dtype=kind)


def batch_inputs(examples: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Tensor]:
    """The examples' loss inputs stacked into tensors ``(B, ...)`` (bools stay bool)."""
    names = examples[0].get("inputs", {}).keys() if examples else ()
    out: dict[str, Tensor] = {}
    for name in names:
        values = [ex["inputs"][name] for ex in examples]
        out[name] = torch.tensor(values, device=device)
        if out[name].dtype == torch.float64:
            out[name] = out[name].float()
    return out
