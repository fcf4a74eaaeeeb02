"""A client for Lambda Cloud API v1 (OpenAPI 1.8.3).

Every answer is an envelope, {"data": ...} or {"error": {"code", "message", "suggestion"}}, and
decisions are made on `code`, never on the wording of `message`. Documented limits: 1 request/s,
one launch per 12 s; 429, 5xx and network errors are retried with backoff.
"""

import os
import time
from functools import partial

import requests

from nanochat.launcher.errors import EXIT_API, EXIT_CONFIG, EXIT_NO_CAPACITY, LaunchError

DEFAULT_API_BASE = "https://cloud.lambda.ai/api/v1"
LAUNCH_PATH = "/instance-operations/launch"


def env_float(name, default):
    # Test knobs (documented in QUICKSTART.md): the real limits are the defaults.
    value = os.environ.get(name)
    return float(value) if value else default


class ApiError(Exception):
    def __init__(self, status, code, message, suggestion=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.suggestion = suggestion
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said

    @property
    def retryable(self):
        # 0 = network error (no HTTP answer), 429 = rate limited, 5xx = server/provider trouble
        return self.status == 0 or self.status == 429 or self.status >= 500

    def __str__(self):
        text = f"{self.message} [{self.code}, HTTP {self.status}]"
        return text + (f" Suggestion: {self.suggestion}" if self.suggestion else "")


class RateLimiter:
    """Spaces calls on our side so that we stay under the documented limits instead of collecting
    429s. The interval runs from the end of the previous call: the server had received that call
    by then, so the spacing holds on the server's clock too, whatever the network delays."""

    def __init__(self, interval):
        self.interval = interval
        self.last = None

    def wait(self, label=None):
        if self.last is None:
            return
        delay = self.last + self.interval - time.monotonic()
        if delay <= 0:
            return
        if label and delay > 2:
            print(f"  waiting {delay:.0f}s ({label})")
        time.sleep(delay)

    def done(self):
        self.last = time.monotonic()


def error_from_response(response, payload):
    """The ApiError for an HTTP answer that carries no data (payload: its parsed JSON, or None)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    retry_after = response.headers.get("Retry-After", "")
    retry_after = float(retry_after) if retry_after.isdigit() else None
    if isinstance(error, dict) and error.get("code"):
        return ApiError(
            response.status_code,
            error["code"],
            error.get("message", ""),
            error.get("suggestion"),
            retry_after,
        )
    return ApiError(
        response.status_code,
        f"http/{response.status_code}",
        f"unexpected response: {response.text[:200]!r}",
        retry_after=retry_after,
    )


class LambdaAPI:
    CAPACITY = "instance-operations/launch/insufficient-capacity"
    WRONG_REGION = "instance-operations/launch/file-system-in-wrong-region"
    NOT_FOUND = "global/object-does-not-exist"
    AUTH_CODES = ("global/invalid-api-key", "global/account-inactive", "global/invalid-address")

    def __init__(self, base, api_key, retries=None):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        # The key lives only in this header: never in a URL, a body or a log line.
        self.session.headers.update(
            {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        )
        self.limiter = RateLimiter(env_float("LAMBDA_RATE_LIMIT_S", 1.0))
        self.launch_limiter = RateLimiter(env_float("LAMBDA_LAUNCH_RATE_LIMIT_S", 12.0))
        self.backoff = env_float("LAMBDA_RETRY_BACKOFF_S", 2.0)
        self.retries = int(env_float("LAMBDA_RETRIES", 5)) if retries is None else retries
        self.timeout = env_float("LAMBDA_HTTP_TIMEOUT_S", 30.0)

    def request(self, method, path, body=None, before_retry=None):
        """The envelope's data. 429, 5xx and network errors are retried with exponential backoff
        (or after the server's Retry-After); before_retry() may return a result that makes the
        retry unnecessary."""
        for attempt in range(self.retries + 1):
            try:
                return self._call_once(method, path, body)
            except ApiError as err:
                if not err.retryable or attempt == self.retries:
                    raise
                if before_retry is not None:
                    result = before_retry()
                    if result is not None:
                        return result
                if err.retry_after is not None:
                    delay = err.retry_after
                else:
                    delay = min(self.backoff * 2**attempt, 60.0)
                print(
                    f"  API {method} {path}: {err.code} (HTTP {err.status}); "
                    f"retry {attempt + 1}/{self.retries} in {delay:.1f}s"
                )
                time.sleep(delay)

    def _call_once(self, method, path, body):
        is_launch = path.startswith(LAUNCH_PATH)
        if is_launch:
            self.launch_limiter.wait("Lambda allows one launch per 12 s")
        self.limiter.wait()
        try:
            response = self.session.request(
                method, self.base + path, json=body, timeout=self.timeout
            )
        except requests.RequestException as e:
            raise ApiError(0, "network/error", f"{type(e).__name__}: {e}") from e
        finally:
            self.limiter.done()
            if is_launch:
                self.launch_limiter.done()
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.ok and isinstance(payload, dict) and "data" in payload:
            return payload["data"]
        raise error_from_response(response, payload)

    def instance_types(self):
        return self.request("GET", "/instance-types")

    def instances(self):
        return self.request("GET", "/instances")

    def instance(self, instance_id):
        return self.request("GET", f"/instances/{instance_id}")

    def ssh_keys(self):
        return self.request("GET", "/ssh-keys")

    def new_instances(self, name, known_ids):
        """Instances called `name` that are not among known_ids: what our launch requests made."""
        return [i for i in self.instances() if i.get("name") == name and i["id"] not in known_ids]

    def launch(self, body, known_ids):
        """Launches one instance and returns its id. A 5xx or a lost answer may still have
        launched it, so before any retry we look for a new instance with our name: one call never
        makes two (billed) instances."""
        look_first = partial(self._launched_anyway, body["name"], known_ids)
        data = self.request("POST", LAUNCH_PATH, body, before_retry=look_first)
        return data["instance_ids"][0]

    def _launched_anyway(self, name, known_ids):
        for inst in self.new_instances(name, known_ids):
            print(f"  the failed launch request did create {inst['id']}; using it")
            return {"instance_ids": [inst["id"]]}
        return None

    def filesystems(self):
        return self.request("GET", "/file-systems")

    def create_filesystem(self, name, region):
        return self.request("POST", "/filesystems", {"name": name, "region": region})

    def terminate(self, instance_id):
        return self.request(
            "POST", "/instance-operations/terminate", {"instance_ids": [instance_id]}
        )


def api_failure(err, what):
    """The LaunchError (and exit code) for an ApiError, decided on its code only."""
    if err.code in LambdaAPI.AUTH_CODES:
        return LaunchError(
            f"{what}: the API rejected the credentials: {err}. Check LAMBDA_API_KEY "
            "(https://cloud.lambda.ai/api-keys) and your account/billing.",
            EXIT_CONFIG,
        )
    if err.code == LambdaAPI.CAPACITY:
        return LaunchError(f"{what}: {err}", EXIT_NO_CAPACITY)
    return LaunchError(f"{what}: {err}", EXIT_API)
