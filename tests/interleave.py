"""Read several streams alternately, one event at a time (what a server or a notebook juggling two generations does)."""
from __future__ import annotations


def read_alternately(*streams) -> list[dict[int, list]]:
    """Tokens per request index of each stream, read event by event in turn until all are exhausted."""
    got = [{} for _ in streams]
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            try:
                event = next(streams[i])
            except StopIteration:
                live.remove(i)
                continue
            got[i].setdefault(event.request, []).extend(event.tokens)
    return got
