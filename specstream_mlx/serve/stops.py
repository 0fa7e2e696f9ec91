"""Stop sequences over streamed text, with OpenAI's semantics.

Generation ends when the text contains a stop string; the stop string and
everything after it are left out. While streaming, text that could be the
start of a stop string is held back until the next piece settles it.
"""

from __future__ import annotations

from typing import Sequence, Tuple


class StopMatcher:
    """Finds stop strings in text that arrives piece by piece.

    Args:
        stops: the stop strings (non-empty strings; may be empty as a list).

    Raises:
        ValueError: an empty stop string (it would match before any text).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> Tuple[str, bool]:
        """Take the next piece of text.

        Args:
            text: newly generated text.

        Returns:
            ``(safe, stopped)``: text that can be sent now, and whether a stop
            string was found (``safe`` then ends right before it).
        """
        if self.stopped:
            return "", True
        buffer = self._held + text
        if not self.stops:
            self._held = ""
            return buffer, False
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            self.stopped = True
            return buffer[: min(found)], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        longest = min(len(buffer), max(len(s) for s in self.stops) - 1)
        for size in range(longest, 0, -1):
            tail = buffer[len(buffer) - size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
