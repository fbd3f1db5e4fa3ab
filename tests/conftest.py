"""Settings every test process needs, set before any test module imports grpc.

grpc's fork handlers abort libguestfs's supermin when a process that already
runs grpc threads launches an appliance; several test modules do both, so the
handlers are turned off for the whole test process. libguestfs runs without
KVM here (direct backend, TCG)."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
