"""Add-wins observed-remove set without tombstones (pinned conversations, tags).

The layout and the join rule are in ``_causal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._causal import ObservedRemove
from ._values import Value, check_value
from ._wire import register


@register
@dataclass(frozen=True, slots=True)
class ORSet(ObservedRemove):
    """A set where an add concurrent with a remove of the same element wins.

    A remove takes away exactly the adds it has observed; an element removed
    here can only reappear through an add that this replica had not seen.
    """

    TAG: ClassVar[int] = 5

    @property
    def value(self) -> frozenset[Value]:
        """The elements."""
        return frozenset(element for element, _ in self.entries)

    def __contains__(self, element: object) -> bool:
        """``element in s``; False for anything that cannot be an element."""
        return type(element) in (bytes, str, int) and bool(self._entry(element))  # type: ignore[arg-type]

    def add(self, replica: int, element: Value) -> ORSet:
        """Add ``element`` (bytes, str or int) on behalf of ``replica``."""
        return self.merge(self.add_delta(replica, element))

    def add_delta(self, replica: int, element: Value) -> ORSet:
        """The delta of :meth:`add`: the element with a fresh dot."""
        return self._add_delta(replica, check_value(element, "element"), None)

    @classmethod
    def _check_arg(cls, key: object) -> Value:
        return check_value(key, "element")
