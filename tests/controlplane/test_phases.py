from controlplane.phases import ITINERARY, Situation, itinerary, situation_of
from ferry.v1 import controlplane_pb2


def _plan(skip: bool) -> controlplane_pb2.Plan:
    return controlplane_pb2.Plan(
        disk_images=controlplane_pb2.DiskImageSource(),
        local=controlplane_pb2.LocalTarget(directory="/x"),
        skip_conversion=skip,
    )


def test_disk_images_to_local_copies_converts_creates_and_completes():
    assert itinerary(situation_of(_plan(False))) == [
        "CopyDisks", "ConvertGuest", "CreateVM", "Completed"
    ]


def test_skipping_conversion_drops_only_convert_guest():
    assert itinerary(situation_of(_plan(True))) == ["CopyDisks", "CreateVM", "Completed"]


def test_a_vsphere_source_to_kubevirt_walks_the_full_itinerary_of_the_design():
    s = Situation(source="vsphere", target="kubevirt", convert=True, power_on=True,
                  has_hooks=True)
    assert itinerary(s) == [p.name for p in ITINERARY] == [
        "PreHook", "StorePowerState", "PowerOffSource", "CreateTargetDisks", "CopyDisks",
        "ConvertGuest", "CreateVM", "PowerOn", "PostHook", "Completed",
    ]


def test_a_local_target_is_never_powered_on():
    s = Situation(source="disk_images", target="local", convert=True, power_on=True)
    assert "PowerOn" not in itinerary(s)
