"""Keep secrets out of MLflow, checkpoints and registered models: every param, tag, metric name and
text artifact passes through here, and so does a checkpoint's ``config.json`` (:meth:`Redactor.tree`).

Three rules, applied together:

1. **Known secret values.** The values of environment variables whose names say they hold a
   secret (``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SESSION_TOKEN``,
   ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``RAY_AUTH_TOKEN``: any name with a
   word ``SECRET``, ``TOKEN``, ``PASSWORD``, ``PASSWD``, ``CREDENTIAL(S)``, ``SIGNATURE`` or a pair
   ``API_KEY``, ``ACCESS_KEY``, ``PRIVATE_KEY``) are replaced by ``***`` wherever they appear.
   ``TOKENIZERS_PARALLELISM`` or ``label_key`` are not secret names.
2. **Passwords in URIs.** ``scheme://user:password@host`` becomes ``scheme://user:***@host``, and
   query parameters named like secrets (``?token=…``, ``X-Amz-Signature=…``) lose their values.
3. **Secret-named keys.** A param whose own name says it holds a secret has its value replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
_SECRET_WORDS = {"secret", "token", "password", "passwd", "credential", "credentials", "signature", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&][^=&\s]*(?:token|secret|password|passwd|signature|credential|api_?key|"
                           r"access_?key)[^=&\s]*=)(?P<value>[^&\s]+)", re.IGNORECASE)
_MIN_SECRET_LEN = 4  # shorter values ("1", "yes") would mask innocent text
_NOT_SECRETS = {"true", "false", "none", "null", "yes"}


def is_secret_name(name: str) -> bool:
    """True for a variable or key name that says it holds a secret (``aws_secret_access_key``)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in zip(words, words[1:], strict=False))


def secret_values(environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The secret values to mask: secret-named environment variables plus ``extra``, longest first
    (so a secret that contains another is masked whole)."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items() if is_secret_name(k)} | {v for v in extra if v}
    found = {v for v in found if len(v) >= _MIN_SECRET_LEN and v.lower() not in _NOT_SECRETS}
    return sorted(found, key=len, reverse=True)


class Redactor:
    """Masks secrets in strings. Built once per run from the environment it runs in."""

    def __init__(self, secrets: Iterable[str] | None = None) -> None:
        self.secrets = list(secrets) if secrets is not None else secret_values()

    def text(self, value: str) -> str:
        out = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
        out = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", out)
        for secret in self.secrets:
            if secret in out:
                out = out.replace(secret, MASK)
        return out

    def params(self, params: Mapping[str, object]) -> dict[str, str]:
        """Params as strings, each name and value redacted; secret-named keys lose their value."""
        out: dict[str, str] = {}
        for key, value in params.items():
            leaf = str(key).rsplit(".", 1)[-1]
            shown = MASK if is_secret_name(leaf) and value not in (None, "") else self.text(str(value))
            out[self.text(str(key))] = shown
        return out

    def tree(self, value: Any) -> Any:
        """A JSON-like value (dicts, lists, strings, numbers) with every string redacted and the
        string values of secret-named keys masked; other values as they are."""
        if isinstance(value, Mapping):
            return {k: MASK if is_secret_name(str(k)) and isinstance(v, str) and v else self.tree(v)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.tree(v) for v in value]
        return self.text(value) if isinstance(value, str) else value

    def leaks(self, value: str) -> list[str]:
        """Which known secrets ``value`` still contains (for checks and tests)."""
        return [s for s in self.secrets if s in value]


def masked_fields(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a JSON-like config whose strings were masked by a redactor (``***``):
    a config read back from a checkpoint needs those given again."""
    if isinstance(value, Mapping):
        return [k for key, v in value.items() for k in masked_fields(v, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in masked_fields(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(value, str) and MASK in value else []
