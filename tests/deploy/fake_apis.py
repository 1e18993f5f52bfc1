"""Local stand-ins for RunPod's and Lambda Cloud's launch endpoints, on 127.0.0.1.

Each checks a request against the provider's documented request shape (as a JSON Schema with no
unknown fields) and answers the way the provider documents: its success body, and its error bodies
for a bad key, a bad request and no capacity. They record what they received for assertions.

RunPod REST v1, POST /v1/pods (https://docs.runpod.io/api-reference/pods/POST/pods): Bearer auth;
201 with the Pod; 400 on invalid input; 401 without a valid key.
Lambda Cloud, POST /api/v1/instance-operations/launch (https://docs-api.lambda.ai/api/cloud#launchInstance):
Bearer (or Basic) auth; 200 {"data": {"instance_ids": [...]}}; errors {"error": {"code", "message", "suggestion"}}.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema

RUNPOD_POD_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["imageName"],
    "properties": {
        "allowedCudaVersions": {"type": "array", "items": {"type": "string"}},
        "cloudType": {"enum": ["SECURE", "COMMUNITY"]},
        "computeType": {"enum": ["GPU", "CPU"]},
        "containerDiskInGb": {"type": "integer", "minimum": 0},
        "containerRegistryAuthId": {"type": ["string", "null"]},
        "countryCodes": {"type": "array", "items": {"type": "string"}},
        "cpuFlavorIds": {"type": "array", "items": {"type": "string"}},
        "cpuFlavorPriority": {"enum": ["availability", "custom"]},
        "dataCenterIds": {"type": "array", "items": {"type": "string"}},
        "dataCenterPriority": {"enum": ["availability", "custom"]},
        "dockerEntrypoint": {"type": "array", "items": {"type": "string"}},
        "dockerStartCmd": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "globalNetworking": {"type": "boolean"},
        "gpuCount": {"type": "integer", "minimum": 1},
        "gpuTypeIds": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "gpuTypePriority": {"enum": ["availability", "custom"]},
        "imageName": {"type": "string", "minLength": 1},
        "interruptible": {"type": "boolean"},
        "locked": {"type": "boolean"},
        "minDiskBandwidthMBps": {"type": "number"},
        "minDownloadMbps": {"type": "number"},
        "minRAMPerGPU": {"type": "integer"},
        "minUploadMbps": {"type": "number"},
        "minVCPUPerGPU": {"type": "integer"},
        "name": {"type": "string", "maxLength": 191},
        "networkVolumeId": {"type": "string"},
        "ports": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]+/(http|tcp|udp)$"}},
        "supportPublicIp": {"type": "boolean"},
        "templateId": {"type": ["string", "null"]},
        "vcpuCount": {"type": "integer"},
        "volumeInGb": {"type": "integer", "minimum": 0},
        "volumeMountPath": {"type": "string"},
    },
}

LAMBDA_LAUNCH_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["region_name", "instance_type_name", "ssh_key_names"],
    "properties": {
        "region_name": {"type": "string", "minLength": 1},
        "instance_type_name": {"type": "string", "minLength": 1},
        "ssh_key_names": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
        "file_system_names": {"type": "array", "items": {"type": "string"}, "maxItems": 1},
        "file_system_mounts": {"type": "array"},
        "hostname": {"type": "string", "pattern": "^[a-z0-9][0-9a-z-]{0,62}$"},
        "name": {"type": "string", "maxLength": 64},
        "image": {"type": "object"},
        "user_data": {"type": "string", "maxLength": 1048576},
        "tags": {"type": "array"},
        "firewall_rulesets": {"type": "array"},
        "quantity": {"type": "integer", "minimum": 1},
    },
}


class FakeAPI:
    """A threaded HTTP server; `requests` holds (path, headers, body) of every call."""

    def __init__(self, handle):
        self.requests: list[tuple[str, dict, object]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = None
                api.requests.append((self.path, dict(self.headers), body))
                status, reply = handle(self.path, self.headers, body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _bearer(headers) -> str | None:
    auth = headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer "):]
    if auth.startswith("Basic "):
        return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
    return None


def runpod(valid_key: str, *, unavailable_gpus: frozenset = frozenset()):
    def handle(path, headers, body):
        if path != "/v1/pods":
            return 404, {"error": "not found"}
        if _bearer(headers) != valid_key:
            return 401, {"error": "Unauthorized"}
        try:
            jsonschema.validate(body, RUNPOD_POD_SCHEMA)
        except jsonschema.ValidationError as e:
            return 400, {"error": f"Invalid input: {e.message}"}
        if unavailable_gpus & set(body.get("gpuTypeIds", [])):
            return 500, {"error": "create pod: There are no longer any instances available with the requested specifications. Please refresh and try again."}
        return 201, {
            "id": "xedezhzb9la3ye",
            "name": body.get("name"),
            "image": body["imageName"],
            "desiredStatus": "RUNNING",
            "env": body.get("env", {}),
            "gpu": {"id": body["gpuTypeIds"][0], "count": body.get("gpuCount", 1)},
            "interruptible": body.get("interruptible", False),
            "containerDiskInGb": body.get("containerDiskInGb", 50),
            "costPerHr": "0.74",
        }
    return FakeAPI(handle)


def lambda_cloud(valid_key: str, *, no_capacity_types: frozenset = frozenset(), echo_auth: bool = False):
    def handle(path, headers, body):
        if path != "/api/v1/instance-operations/launch":
            return 404, {"error": {"code": "global/object-does-not-exist", "message": "Not found"}}
        if _bearer(headers) != valid_key:
            message = "API key was invalid, expired, or deleted."
            if echo_auth:  # a server that quotes what it got: the client must scrub it
                message += f" Received: {headers.get('Authorization')}"
            return 401, {"error": {"code": "global/invalid-api-key", "message": message,
                                   "suggestion": "Check your API key or create a new one, then try again."}}
        try:
            jsonschema.validate(body, LAMBDA_LAUNCH_SCHEMA)
        except jsonschema.ValidationError as e:
            return 400, {"error": {"code": "global/invalid-parameters", "message": e.message}}
        if body["instance_type_name"] in no_capacity_types:
            return 400, {"error": {"code": "instance-operations/launch/insufficient-capacity",
                                   "message": "Not enough capacity to fulfill launch request.",
                                   "suggestion": "Choose an instance type with more availability, or try again later."}}
        return 200, {"data": {"instance_ids": ["0920582c7ff041399e34823a0be62549"]}}
    return FakeAPI(handle)
