"""What web hosts ask of a downloader: X-Robots-Tag opt-outs, robots.txt rules, Retry-After.

Pure parsing, no I/O: ``data_tools.fetch`` checks each answer's headers with
``x_robots_opt_out`` before reading its body, and ``data_tools.hosts`` fetches each host's
robots.txt once (with ``--robots-txt``) and asks ``RobotsRules.allows`` for every URL. Try the
header parser by hand with ``python -m data_tools.polite 'otherbot: noai, noindex'``.

X-Robots-Tag (Google's and Bing's documented syntax; "noai"/"noimageai" from DeviantArt and
img2dataset's default set): a header value is a comma list of directives, optionally scoped to
one crawler by a leading product token (``X-Robots-Tag: otherbot: noindex, nofollow``); scoped
directives bind only the crawler they name, unscoped ones bind everyone; names are
case-insensitive; ``none`` means ``noindex, nofollow``; the header may be repeated.

robots.txt follows RFC 9309: the groups whose user-agent equals our product token
(case-insensitive) are merged, else the ``*`` groups; the longest matching Allow/Disallow
pattern wins, Allow on a tie; ``*`` matches any run of characters and a trailing ``$`` anchors.
"""

from __future__ import annotations

import email.utils
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timezone

# img2dataset's default --disallowed_header_directives: the opt-outs image hosts actually send.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
# Directives whose name is followed by ":" and a value; any other "NAME: ..." is a crawler scope.
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
_IMPLIES = {"none": ("noindex", "nofollow")}
_PRODUCT_TOKEN = re.compile(r"^[a-z0-9_.*-]+$")
ROBOTS_MAX_BYTES = 512 << 10  # RFC 9309: parse at least the first 500 KiB


def product_token(user_agent: str) -> str:
    """``clipforge-data_tools/0.1.0 (+URL)`` -> ``clipforge-data_tools``: the name sites address."""
    return user_agent.split("/", 1)[0].split()[0].strip().lower() if user_agent.strip() else ""


def x_robots_opt_out(values: Iterable[str], token: str, disallowed: Iterable[str]) -> str | None:
    """The first directive in ``disallowed`` that binds crawler ``token``, or None.

    ``values`` are all X-Robots-Tag header values of one answer; the result names the
    directive (``"noai"``, or ``"mybot: noindex"`` when it was scoped to us).
    """
    banned = {d.lower() for d in disallowed}
    token = token.lower()
    if not banned:
        return None
    for value in values:
        scope: str | None = None  # a scope lasts to the end of its header value
        for part in value.split(","):
            name, sep, rest = part.strip().partition(":")
            name = name.strip().lower()
            if sep and name not in _VALUED and _PRODUCT_TOKEN.match(name) and rest.strip():
                scope = name  # "otherbot: noindex": the directive follows the token
                name = rest.strip().partition(":")[0].strip().lower()
            if scope is not None and scope != token:
                continue
            for directive in (name, *_IMPLIES.get(name, ())):
                if directive in banned:
                    return directive if scope is None else f"{scope}: {directive}"
    return None


def _pattern(path: str) -> re.Pattern[str]:
    anchored = path.endswith("$")
    body = ".*".join(re.escape(piece) for piece in path.rstrip("$").split("*"))
    return re.compile(body + ("$" if anchored else ""))


@dataclass
class RobotsRules:
    """One host's rules for one crawler; an empty rule list allows everything."""

    rules: list[tuple[int, bool, re.Pattern[str]]] = field(default_factory=list)
    reason: str | None = None  # set when everything is disallowed without rules (unreachable)
    # When the host itself could not be reached (no answer at all, not a 5xx), the rows are
    # failures of that category ("timeout", "dns failed"), not opt-outs.
    failure: str | None = None

    @classmethod
    def allow_all(cls) -> RobotsRules:
        return cls()

    @classmethod
    def disallow_all(cls, reason: str, failure: str | None = None) -> RobotsRules:
        return cls([(0, False, re.compile(""))], reason, failure)

    def allows(self, path: str) -> bool:
        """``path`` is the URL's path and query (``/img/1.jpg?x=2``)."""
        if path == "/robots.txt":
            return True
        best: tuple[int, bool] | None = None
        for length, allow, pattern in self.rules:
            if pattern.match(path) and (best is None or (length, allow) > best):
                best = (length, allow)  # longest wins; on a tie True > False: Allow wins
        return best is None or best[1]


def parse_robots(text: str, token: str) -> RobotsRules:
    """The rules of ``text`` that apply to crawler ``token`` (RFC 9309 group selection)."""
    groups: list[tuple[set[str], list[tuple[bool, str]]]] = []
    in_agents = False  # consecutive user-agent lines open one group
    for raw in text.splitlines():
        key, sep, value = raw.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            continue
        if key == "user-agent":
            if not in_agents:
                groups.append((set(), []))
                in_agents = True
            groups[-1][0].add(value.lower())
        elif key in ("allow", "disallow") and groups:
            in_agents = False
            if value:  # "Disallow:" with no path is no rule at all
                groups[-1][1].append((key == "allow", value))
        else:
            in_agents = False  # sitemap and unknown keys end a user-agent run too
    token = token.lower()
    chosen = [rules for agents, rules in groups if token in agents]
    if not chosen:
        chosen = [rules for agents, rules in groups if "*" in agents]
    merged = [(len(p), allow, _pattern(p)) for rules in chosen for allow, p in rules]
    return RobotsRules(merged)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date) as seconds from now; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


if __name__ == "__main__":
    hit = x_robots_opt_out(sys.argv[1:], "clipforge-data_tools", OPT_OUT_DIRECTIVES)
    print(f"opt-out: {hit}" if hit else "allowed")
