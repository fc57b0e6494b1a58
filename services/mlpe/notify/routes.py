"""Where alerts go: routes matched on severity and labels, each to a webhook named by an
environment variable (the URL is a secret: never in a file, a log or an error). The
variables are read through Settings.secret, the routes file only names them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlpe.v1 import alerts_pb2

SEVERITIES = {"info": alerts_pb2.SEVERITY_INFO, "warning": alerts_pb2.SEVERITY_WARNING,
              "critical": alerts_pb2.SEVERITY_CRITICAL}


class RoutesError(ValueError):
    """A bad routes file; the message names the file and line."""


@dataclass(frozen=True)
class Route:
    name: str
    webhook_env: str
    severities: frozenset[int] = frozenset()          # empty: any severity
    labels: dict[str, str] = field(default_factory=dict)  # "*" = label present

    def matches(self, alert: alerts_pb2.Alert) -> bool:
        if self.severities and alert.severity not in self.severities:
            return False
        for key, want in self.labels.items():
            have = alert.labels.get(key)
            if have is None or (want != "*" and have != want):
                return False
        return True

    def webhook_url(self, secret: Callable[[str], str | None]) -> str | None:
        return secret(self.webhook_env) or None


@dataclass(frozen=True)
class Routes:
    routes: tuple[Route, ...]
    default: Route

    def match(self, alert: alerts_pb2.Alert) -> list[Route]:
        """Every matching route; the default route when none matches."""
        return [r for r in self.routes if r.matches(alert)] or [self.default]

    def by_name(self, name: str) -> Route | None:
        return next((r for r in (*self.routes, self.default) if r.name == name), None)


DEFAULT = Route("default", "MLPE_SLACK_WEBHOOK_URL")


def load(path: str | None) -> Routes:
    """Routes from a YAML file (see README); without one, everything goes to the default."""
    if not path:
        return Routes((), DEFAULT)
    try:
        root = yaml.compose(Path(path).read_text())
    except OSError as err:
        raise RoutesError(f"{path}: cannot read routes: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RoutesError(f"{path}, line {mark.line + 1 if mark else '?'}: not valid YAML") \
            from None
    data = yaml.safe_load(Path(path).read_text()) or {}
    lines = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "routes" and isinstance(value, yaml.SequenceNode):
                lines = {i: item.start_mark.line + 1 for i, item in enumerate(value.value)}
    if not isinstance(data, dict) or not isinstance(data.get("routes", []), list):
        raise RoutesError(f"{path}: expected a mapping with a list under 'routes'")
    routes = []
    for i, item in enumerate(data.get("routes", [])):
        where = f"{path}, line {lines.get(i, '?')}"
        if not isinstance(item, dict) or not item.get("name") or not item.get("webhook_env"):
            raise RoutesError(f"{where}: a route needs 'name' and 'webhook_env'")
        unknown = set(item) - {"name", "webhook_env", "severity", "labels"}
        if unknown:
            raise RoutesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        wanted = item.get("severity", [])
        wanted = [wanted] if isinstance(wanted, str) else wanted
        bad = [s for s in wanted if s not in SEVERITIES]
        if bad:
            raise RoutesError(f"{where}: unknown severity {bad[0]!r} "
                              f"(expected {', '.join(SEVERITIES)})")
        labels = item.get("labels", {}) or {}
        if not isinstance(labels, dict):
            raise RoutesError(f"{where}: 'labels' must be a mapping of label: value")
        routes.append(Route(str(item["name"]), str(item["webhook_env"]),
                            frozenset(SEVERITIES[s] for s in wanted),
                            {str(k): str(v) for k, v in labels.items()}))
    default_env = data.get("default_webhook_env", DEFAULT.webhook_env)
    return Routes(tuple(routes), Route("default", str(default_env)))
