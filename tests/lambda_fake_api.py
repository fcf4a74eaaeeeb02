"""
A loopback test double of the Lambda Cloud API v1 (OpenAPI 1.8.3), enough for launch_lambda.py:
instance-types, ssh-keys, instances (list/get), launch (with file_system_names /
file_system_mounts), terminate, and filesystems (list, create, delete). It follows the spec's
envelopes and error codes, and, when the spec file is available, validates every request body
and every response it sends against the spec's schemas (violations are collected in
`fake.violations`).

Scripted behaviour for failure tests:
  fake.fail(method, path_regex, status, code, times=1, create=False, retry_after=None)
      answer the next `times` matching requests with that error (create=True: perform a launch
      first, then lose the answer, as a timeout or 5xx after the fact would)
  fake.no_capacity_launches = N   the next N launches answer insufficient-capacity
  fake.capacity = {type: [regions]}   what instance-types reports as available
  fake.boot_polls = N             GETs of an instance before it turns active (with fake.ip)
  fake.ips = [IP, ...]            the public IPs of the instances in launch order (then fake.ip);
                                  the k-th launched gets private IP 10.0.0.<k+2>
  fake.never_active = True        instances stay "booting" forever
  fake.launch_window = S          launches closer than S seconds apart get 429 (the documented
                                  limit)
  fake.on_terminate(instance)     hook: the test uses it to kill what "ran on" the instance
  fake.on_active(instance)        hook: called once when an instance turns active
  fake.nfs_root = DIR             where filesystems are mounted (default /lambda/nfs, as on Lambda):
                                  a test points it at a local directory shared by its "instances"
  fake.prices = {type: cents}     price overrides (a cost cap reached in seconds, not hours)
  fake.set_status(id, status)     the platform's view changes (e.g. "unhealthy", "terminated")
"""

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/api/v1"

REGIONS = {"us-west-1": "California, USA", "us-east-1": "Virginia, USA", "us-south-1": "Texas, USA"}

INSTANCE_TYPES = {
    "gpu_8x_h100_sxm5": ("8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 208, 1800, 24780, 8),
    "gpu_1x_a10": ("1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, 30, 200, 1400, 1),
    "gpu_1x_h100_pcie": ("1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 26, 200, 1024, 1),
}

# The spec documents the error envelope in its description but lists no schema for 429 or for most
# 5xx answers: those are checked against this generic envelope (code, message, optional suggestion).
GENERIC_ERROR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "suggestion": {"type": "string"},
            },
        }
    },
}

ERROR_MESSAGES = {
    "global/invalid-api-key": (
        "API key was invalid, expired, or deleted.",
        "Check your API key or create a new one, then try again.",
    ),
    "global/object-does-not-exist": ("Specified instance does not exist.", "Check the ID."),
    "global/invalid-parameters": ("Invalid request data.", None),
    "instance-operations/launch/insufficient-capacity": (
        "Not enough capacity to fulfill launch request.",
        "Choose an instance type with more availability, or try again later.",
    ),
    "global/quota-exceeded": ("Quota exceeded.", "Contact Support to increase your quota."),
    "global/internal-error": (
        "An internal server error occurred.",
        "Try again later. Contact Support if the problem persists.",
    ),
    "provider/internal-unavailable": ("Provider unavailable", "Try again shortly"),
    "global/rate-limited": ("Too many requests.", "Slow down."),
    "global/duplicate": ("A filesystem with that name already exists.", "Choose another name."),
    "filesystems/filesystem-in-use": (
        "Filesystem is mounted to a running instance.",
        "Terminate the instances that use it first.",
    ),
    "instance-operations/launch/file-system-in-wrong-region": (
        "File system is in a different region than the instance.",
        "Launch in the filesystem's region.",
    ),
}


class SpecValidator:
    """Validates bodies against the OpenAPI document's schemas, resolving its $refs with
    `referencing`."""

    def __init__(self, spec):
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.spec = spec
        self.Validator = Draft202012Validator
        self.registry = Registry().with_resource(
            "spec.json", Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        self.routes = []
        for template, ops in spec["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            self.routes.append((re.compile(pattern), template, ops))

    def _errors(self, pointer_or_schema, instance):
        schema = (
            {"$ref": "spec.json#" + pointer_or_schema}
            if isinstance(pointer_or_schema, str)
            else pointer_or_schema
        )
        validator = self.Validator(schema, registry=self.registry)
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(instance)
        ]

    def operation(self, method, path):
        for pattern, template, ops in self.routes:
            if pattern.match(path) and method.lower() in ops:
                return template, ops[method.lower()]
        return None, None

    @staticmethod
    def _escape(template):
        return template.replace("~", "~0").replace("/", "~1")

    def check_request(self, method, path, body):
        template, op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in the spec"]
        if "requestBody" not in op:
            return [] if body is None else [f"{method} {path}: the spec defines no request body"]
        if body is None:
            return [f"{method} {path}: request body required"]
        pointer = (
            f"/paths/{self._escape(template)}/{method.lower()}/requestBody"
            "/content/application~1json/schema"
        )
        return [f"request {method} {path}: {e}" for e in self._errors(pointer, body)]

    def check_response(self, method, path, status, payload):
        template, op = self.operation(method, path)
        if op is None:
            return []  # already reported for the request
        if str(status) in op["responses"]:
            pointer = (
                f"/paths/{self._escape(template)}/{method.lower()}/responses/{status}"
                "/content/application~1json/schema"
            )
            return [
                f"response {status} {method} {path}: {e}" for e in self._errors(pointer, payload)
            ]
        # Undocumented per operation (429, 5xx): the envelope the spec's description documents.
        schema = GENERIC_ERROR
        if status == 500 and payload.get("error", {}).get("code") == "global/internal-error":
            schema = {
                "type": "object",
                "required": ["error"],
                "additionalProperties": False,
                "properties": {"error": {"$ref": "spec.json#/components/schemas/ApiErrorInternal"}},
            }
        return [f"response {status} {method} {path}: {e}" for e in self._errors(schema, payload)]


class FakeLambda:
    def __init__(self, api_key, spec=None, ip="127.0.0.1", ssh_key_names=("laptop",)):
        self.api_key = api_key
        self.validator = SpecValidator(spec) if spec is not None else None
        self.ip = ip
        self.ssh_keys = [
            {
                "id": uuid.uuid4().hex,
                "name": n,
                "public_key": "ssh-ed25519 "
                "AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000 test",
            }
            for n in ssh_key_names
        ]
        self.capacity = {
            "gpu_8x_h100_sxm5": ["us-west-1", "us-east-1"],
            "gpu_1x_a10": ["us-east-1"],
            "gpu_1x_h100_pcie": [],
        }
        self.instances = {}
        self.ips = []
        self.boot_polls = 1
        self.never_active = False
        self.no_capacity_launches = 0
        self.launch_window = 0.0
        self.on_terminate = None
        self.on_active = None
        self.nfs_root = "/lambda/nfs"
        self.prices = {}
        self.filesystems = {}  # id -> the spec's Filesystem object
        self.faults = []
        self.requests = []  # dicts: method, path, body (parsed), raw, auth, time, status
        self.violations = []
        self.lock = threading.Lock()
        self._last_launch = None
        self._polls = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ---- lifecycle and helpers for tests ----
    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method, path_regex, status, code, times=1, create=False, retry_after=None):
        self.faults.append(
            {
                "method": method,
                "re": re.compile(path_regex),
                "status": status,
                "code": code,
                "times": times,
                "create": create,
                "retry_after": retry_after,
            }
        )

    def running(self):
        return [
            i for i in self.instances.values() if i["status"] not in ("terminated", "terminating")
        ]

    def launches(self):
        return [r for r in self.requests if r["path"].endswith("/instance-operations/launch")]

    # ---- API behaviour ----
    def _instance_type(self, name):
        desc, gpu, cents, vcpus, mem, disk, gpus = INSTANCE_TYPES[name]
        return {
            "name": name,
            "description": desc,
            "gpu_description": gpu,
            "price_cents_per_hour": self.prices.get(name, cents),
            "specs": {"vcpus": vcpus, "memory_gib": mem, "storage_gib": disk, "gpus": gpus},
        }

    def _public(self, inst):
        out = {k: v for k, v in inst.items() if not k.startswith("_")}
        available = inst["status"] == "active"
        action = (
            {"available": available}
            if available
            else {
                "available": False,
                "reason_code": "vm-has-not-launched",
                "reason_description": "Not launched yet.",
            }
        )
        out["actions"] = {
            k: dict(action) for k in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")
        }
        if inst["status"] in ("terminating", "terminated"):
            out["actions"] = {
                k: {"available": False, "reason_code": "vm-is-terminating"}
                for k in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")
            }
        return out

    def _advance(self, inst):
        if inst["status"] != "booting" or self.never_active:
            return
        self._polls[inst["id"]] = self._polls.get(inst["id"], 0) + 1
        if self._polls[inst["id"]] >= self.boot_polls:
            k = list(self.instances).index(inst["id"])  # launch order
            inst.update(
                status="active",
                ip=self.ips[k] if k < len(self.ips) else self.ip,
                private_ip=f"10.0.0.{k + 2}",
                hostname="fake-" + inst["id"][:8],
            )
            if self.on_active:
                self.on_active(inst)

    def set_status(self, instance_id, status):
        with self.lock:
            self.instances[instance_id]["status"] = status

    def create_filesystem(self, name, region):
        """What POST /filesystems does; tests call it to set up an account's existing one."""
        fid = uuid.uuid4().hex
        self.filesystems[fid] = {
            "id": fid,
            "name": name,
            "mount_point": f"{self.nfs_root}/{name}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "created_by": {"id": uuid.uuid4().hex, "email": "me@example.com", "status": "active"},
            "is_in_use": False,
            "region": {"name": region, "description": REGIONS[region]},
            "bytes_used": 0,
        }
        return self.filesystems[fid]

    def _in_use(self, name):
        return any(
            name in i["file_system_names"]
            for i in self.instances.values()
            if i["status"] not in ("terminated", "terminating")
        )

    def _public_filesystem(self, fs):
        return dict(fs, is_in_use=self._in_use(fs["name"]))

    def _create_filesystem(self, body):
        if any(fs["name"] == body["name"] for fs in self.filesystems.values()):
            return 400, self._error("global/duplicate")
        if body["region"] not in REGIONS:
            return 400, self._error("global/invalid-parameters", "Unknown region.")
        fs = self.create_filesystem(body["name"], body["region"])
        return 200, {"data": self._public_filesystem(fs)}

    def _delete_filesystem(self, fid):
        fs = self.filesystems.get(fid)
        if fs is None:
            return 404, self._error("global/object-does-not-exist", "Filesystem was not found.")
        if self._in_use(fs["name"]):
            return 400, self._error("filesystems/filesystem-in-use")
        del self.filesystems[fid]
        return 200, {"data": {"deleted_ids": [fid]}}

    def _mounts(self, body, region):
        """(names, mounts) the launch asks for, or an error (status, payload). The spec: names
        mount at the filesystem's default point; `file_system_mounts` entries choose their own."""
        by_name = {fs["name"]: fs for fs in self.filesystems.values()}
        by_id = {fs["id"]: fs for fs in self.filesystems.values()}
        wanted = {}
        for name in body.get("file_system_names", []):
            if name not in by_name:
                return None, (
                    404,
                    self._error(
                        "global/object-does-not-exist",
                        f"Filesystem {name} was not found.",
                        "Check the filesystem name.",
                    ),
                )
            wanted[by_name[name]["id"]] = by_name[name]["mount_point"]
        for entry in body.get("file_system_mounts", []):
            if entry["file_system_id"] not in by_id:
                return None, (
                    404,
                    self._error(
                        "global/object-does-not-exist",
                        "Filesystem was not found.",
                        "Check the filesystem id.",
                    ),
                )
            wanted[entry["file_system_id"]] = entry["mount_point"]
        for fid in wanted:
            if by_id[fid]["region"]["name"] != region:
                return None, (
                    400,
                    self._error("instance-operations/launch/file-system-in-wrong-region"),
                )
        names = [by_id[fid]["name"] for fid in wanted]
        mounts = [{"mount_point": mp, "file_system_id": fid} for fid, mp in wanted.items()]
        return (names, mounts), None

    def _launch(self, body):
        name = body["instance_type_name"]
        if len(body["ssh_key_names"]) != 1:
            return 400, self._error(
                "global/invalid-parameters", "Exactly one SSH key must be specified."
            )
        if body["ssh_key_names"][0] not in [k["name"] for k in self.ssh_keys]:
            return 404, self._error(
                "global/object-does-not-exist", "SSH key not found.", "Check the key name."
            )
        if name not in INSTANCE_TYPES:
            return 404, self._error(
                "global/object-does-not-exist", "Instance type not found.", "List instance types."
            )
        mounted, error = self._mounts(body, body["region_name"])
        if error:
            return error
        if self.no_capacity_launches > 0 or body["region_name"] not in self.capacity.get(name, []):
            self.no_capacity_launches = max(0, self.no_capacity_launches - 1)
            return 400, self._error("instance-operations/launch/insufficient-capacity")
        iid = uuid.uuid4().hex
        names, mounts = mounted
        self.instances[iid] = {
            "id": iid,
            "name": body.get("name", ""),
            "status": "booting",
            "ssh_key_names": body["ssh_key_names"],
            "file_system_names": names,
            "region": {"name": body["region_name"], "description": REGIONS[body["region_name"]]},
            "instance_type": self._instance_type(name),
            "is_reserved": False,
            "tags": [],
        }
        if mounts:  # the spec: absent when nothing is mounted
            self.instances[iid]["file_system_mounts"] = mounts
        return 200, {"data": {"instance_ids": [iid]}}

    def _terminate(self, body):
        found = [self.instances.get(i) for i in body["instance_ids"]]
        if not body["instance_ids"] or any(f is None or f["status"] == "terminated" for f in found):
            return 404, self._error("global/object-does-not-exist")
        out = []
        for inst in found:
            inst["status"] = "terminating"
            out.append(self._public(inst))
            inst["status"] = "terminated"
            if self.on_terminate:
                self.on_terminate(inst)
        return 200, {"data": {"terminated_instances": out}}

    def _error(self, code, message=None, suggestion=None):
        default_message, default_suggestion = ERROR_MESSAGES.get(code, ("Error.", None))
        err = {"code": code, "message": message or default_message}
        if suggestion or default_suggestion:
            err["suggestion"] = suggestion or default_suggestion
        return {"error": err}

    def handle(self, method, path, body, auth):
        """Returns (status, payload, headers)."""
        if auth != f"Bearer {self.api_key}":
            return 401, self._error("global/invalid-api-key"), {}
        for fault in self.faults:
            if fault["times"] > 0 and fault["method"] == method and fault["re"].search(path):
                fault["times"] -= 1
                if fault["create"]:
                    self._launch(body)
                headers = (
                    {"Retry-After": str(fault["retry_after"])}
                    if fault["retry_after"] is not None
                    else {}
                )
                return fault["status"], self._error(fault["code"]), headers
        if method == "GET" and path == "/instance-types":
            data = {
                n: {
                    "instance_type": self._instance_type(n),
                    "regions_with_capacity_available": [
                        {"name": r, "description": REGIONS[r]} for r in self.capacity.get(n, [])
                    ],
                }
                for n in INSTANCE_TYPES
            }
            return 200, {"data": data}, {}
        if method == "GET" and path == "/ssh-keys":
            return 200, {"data": self.ssh_keys}, {}
        if method == "GET" and path == "/instances":
            for inst in self.instances.values():
                self._advance(inst)
            return (
                200,
                {
                    "data": [
                        self._public(i)
                        for i in self.instances.values()
                        if i["status"] != "terminated"
                    ]
                },
                {},
            )
        m = re.fullmatch(r"/instances/([^/]+)", path)
        if method == "GET" and m:
            inst = self.instances.get(m.group(1))
            if inst is None:
                return 404, self._error("global/object-does-not-exist"), {}
            self._advance(inst)
            return 200, {"data": self._public(inst)}, {}
        if method == "POST" and path == "/instance-operations/launch":
            now = time.monotonic()
            if self._last_launch is not None and now - self._last_launch < self.launch_window:
                return 429, self._error("global/rate-limited"), {}
            self._last_launch = now
            status, payload = self._launch(body)
            return status, payload, {}
        if method == "POST" and path == "/instance-operations/terminate":
            status, payload = self._terminate(body)
            return status, payload, {}
        if method == "GET" and path == "/file-systems":
            return (
                200,
                {"data": [self._public_filesystem(f) for f in self.filesystems.values()]},
                {},
            )
        if method == "POST" and path == "/filesystems":
            status, payload = self._create_filesystem(body)
            return status, payload, {}
        m = re.fullmatch(r"/filesystems/([^/]+)", path)
        if method == "DELETE" and m:
            status, payload = self._delete_filesystem(m.group(1))
            return status, payload, {}
        return 404, self._error("global/object-does-not-exist", f"No route {method} {path}"), {}

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self, method):
                full = self.path.split("?", 1)[0]
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                path = full[len(PREFIX) :] if full.startswith(PREFIX) else full
                with fake.lock:
                    record = {
                        "method": method,
                        "path": full,
                        "body": body,
                        "raw": raw.decode(errors="replace"),
                        "auth": self.headers.get("Authorization", ""),
                        "time": time.monotonic(),
                    }
                    fake.requests.append(record)
                    if fake.validator:
                        fake.violations += fake.validator.check_request(method, full, body)
                    if not full.startswith(PREFIX):
                        status, payload, headers = (
                            404,
                            fake._error("global/object-does-not-exist"),
                            {},
                        )
                    else:
                        status, payload, headers = fake.handle(method, path, body, record["auth"])
                    record["status"] = status
                    if fake.validator:
                        fake.violations += fake.validator.check_response(
                            method, full, status, payload
                        )
                out = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

        return Handler
