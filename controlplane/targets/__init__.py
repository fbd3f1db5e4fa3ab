"""Where migrated VMs land: each target prepares, creates and cleans up a VM."""
