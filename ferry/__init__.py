"""Ferry: move virtual machines onto KubeVirt. Shared pieces live here; the
services are the sibling packages transferd, converter and controlplane."""
