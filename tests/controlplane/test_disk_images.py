"""Image validation and the read-only NBD export, on real images made with
qemu-img and served by a real qemu-nbd."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

import nbd
import pytest

from controlplane.providers import disk_images
from controlplane.providers.disk_images import ImageProblem, inspect_image
from ferry import errors
from tests.controlplane.conftest import make_raw_with_mbr, qemu_img


def _problem(path: Path) -> ImageProblem:
    with pytest.raises(ImageProblem) as e:
        inspect_image(str(path))
    return e.value


def test_raw_with_mbr_is_accepted(raw_disk: Path):
    info = inspect_image(str(raw_disk))
    assert (info.format, info.virtual_size) == ("raw", 16 << 20)


def test_raw_with_gpt_is_accepted(tmp_path: Path):
    path = tmp_path / "gpt.raw"
    qemu_img("create", "-f", "raw", str(path), "8M")
    subprocess.run(["sfdisk", "--quiet", str(path)], input=b"label: gpt\n,,L\n", check=True,
                   capture_output=True)
    assert inspect_image(str(path)).format == "raw"


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_qcow2_and_vmdk_are_accepted_with_their_virtual_size(tmp_path: Path, fmt: str):
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, str(path), "1G")
    info = inspect_image(str(path))
    assert (info.format, info.virtual_size) == (fmt, 1 << 30)


def test_a_text_file_is_not_a_disk_image(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 200)
    e = _problem(path)
    assert e.kind == "NotADiskImage"
    assert str(e) == (
        f"{path} is not a disk image: it has no MBR or GPT partition table; pass a raw disk "
        "image with an MBR or GPT partition table, a qcow2 or a vmdk image"
    )


def test_an_empty_file_is_not_a_disk_image(tmp_path: Path):
    path = tmp_path / "empty.img"
    path.touch()
    e = _problem(path)
    assert e.kind == "NotADiskImage"
    assert "is not a disk image: it is empty" in str(e)


def test_a_raw_file_without_partition_table_is_refused(tmp_path: Path):
    path = tmp_path / "blank.raw"
    qemu_img("create", "-f", "raw", str(path), "4M")
    e = _problem(path)
    assert e.kind == "NotADiskImage"
    assert "no MBR or GPT partition table" in str(e)


def test_a_missing_file_names_the_path(tmp_path: Path):
    e = _problem(tmp_path / "nope.vmdk")
    assert e.kind == "DiskNotFound"
    assert str(e) == f"disk image {tmp_path / 'nope.vmdk'} does not exist; check the path"


def test_a_directory_is_not_a_disk_image(tmp_path: Path):
    assert _problem(tmp_path).kind == "NotADiskImage"


def test_other_formats_are_refused_with_the_conversion_to_run(tmp_path: Path):
    path = tmp_path / "disk.vdi"
    qemu_img("create", "-f", "vdi", str(path), "8M")
    e = _problem(path)
    assert e.kind == "UnsupportedImageFormat"
    assert "is a vdi image" in str(e) and "qemu-img convert -O qcow2" in str(e)


def make_luks_qcow2(path: Path) -> None:
    """A LUKS-encrypted qcow2. qemu-img times a first PBKDF2 round with the
    thread's CPU clock; where the kernel counts CPU time in ticks that round
    can measure 0 ms, and qemu-img gives up with "Unable to get accurate CPU
    usage" (seen here about once in five). Another try measures again."""
    argv = ["qemu-img", "create", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
            "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(path),
            "8M"]
    for _ in range(10):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in done.stderr, done.stderr
    raise AssertionError(f"qemu-img could not create {path}: {done.stderr}")


def test_an_encrypted_image_is_refused(tmp_path: Path):
    path = tmp_path / "secret.qcow2"
    make_luks_qcow2(path)
    e = _problem(path)
    assert e.kind == "EncryptedImage"
    assert f"{path} is encrypted" in str(e)


def test_a_backing_file_outside_the_image_directory_is_refused(tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "vm").mkdir()
    base = make_raw_with_mbr(tmp_path / "elsewhere" / "base.raw")
    top = tmp_path / "vm" / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top))
    e = _problem(top)
    assert e.kind == "BackingFileOutsideDirectory"
    assert str(base) in str(e) and "flatten it" in str(e)


def test_a_relative_backing_file_escaping_with_dotdot_is_refused(tmp_path: Path):
    (tmp_path / "vm").mkdir()
    make_raw_with_mbr(tmp_path / "base.raw")
    top = tmp_path / "vm" / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "../base.raw", str(top))
    assert _problem(top).kind == "BackingFileOutsideDirectory"


def test_a_backing_chain_inside_the_directory_is_accepted(tmp_path: Path):
    make_raw_with_mbr(tmp_path / "base.raw")
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "base.raw", str(tmp_path / "mid.qcow2"))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(top))
    assert inspect_image(str(top)).virtual_size == 16 << 20


def test_the_vmx_beside_the_disk_is_found_by_stem_or_by_reference(tmp_path: Path):
    disk = make_raw_with_mbr(tmp_path / "web.vmdk", data=False)
    assert disk_images.find_vmx(str(disk)) is None
    other = tmp_path / "machine.vmx"
    other.write_text('scsi0:0.fileName = "web.vmdk"\n')
    assert disk_images.find_vmx(str(disk)) == other
    same = tmp_path / "web.vmx"
    same.write_text('displayName = "Web 01!"\n')
    assert disk_images.find_vmx(str(disk)) == same
    assert disk_images.vm_name_from(str(disk), disk_images.read_vmx(same)) == "Web-01"
    assert disk_images.vm_name_from(str(disk), None) == "web"


def _qemu_nbd_pids(socket_path: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[0].endswith(b"qemu-nbd") and f"--socket={socket_path}".encode() in cmdline:
            pids.append(int(pid))
    return pids


def test_serve_image_exports_read_only_and_stops_qemu_nbd(raw_disk: Path, tmp_path: Path):
    before = hashlib.sha256(raw_disk.read_bytes()).hexdigest()
    sock = str(tmp_path / "s.sock")
    info = inspect_image(str(raw_disk))

    async def use_export() -> tuple[bytes, bool, int, list[int]]:
        async with disk_images.serve_image(info, sock) as uri:
            h = nbd.NBD()
            h.connect_uri(uri)
            data = h.pread(65536, 1 << 20)
            read_only = bool(h.is_read_only())
            size = h.get_size()
            h.shutdown()
            return data, read_only, size, _qemu_nbd_pids(sock)

    data, read_only, size, running = asyncio.run(use_export())
    assert data == raw_disk.read_bytes()[1 << 20:(1 << 20) + 65536]
    assert read_only and size == 16 << 20
    assert len(running) == 1
    assert _qemu_nbd_pids(sock) == []
    assert not os.path.exists(sock)
    assert hashlib.sha256(raw_disk.read_bytes()).hexdigest() == before


def test_serve_image_reports_why_qemu_nbd_could_not_start(tmp_path: Path, raw_disk: Path):
    info = inspect_image(str(raw_disk))
    raw_disk.unlink()

    async def use_export() -> None:
        async with disk_images.serve_image(info, str(tmp_path / "s.sock")):
            pass

    with pytest.raises(errors.OperationFailed) as e:
        asyncio.run(use_export())
    assert f"qemu-nbd could not serve {info.path}" in str(e.value)


def _image_with_data(path: Path, fmt: str) -> Path:
    """A qcow2/vmdk with 8 MiB of real data, so its metadata points past 1 MiB."""
    qemu_img("create", "-f", fmt, str(path), "64M")
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x55 0 8M", str(path)],
                   check=True, capture_output=True)
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_a_truncated_image_is_refused_not_copied_as_zeros(tmp_path: Path, fmt: str):
    path = _image_with_data(tmp_path / f"disk.{fmt}", fmt)
    os.truncate(path, 1 << 20)
    e = _problem(path)
    assert e.kind == "CorruptImage"
    assert str(e).startswith(f"disk image {path} is truncated or corrupt (qemu-img check: ")
    assert str(e).endswith("); copy it again from the datastore")
    assert len(str(e)) < 500


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_a_whole_image_with_data_passes_the_check(tmp_path: Path, fmt: str):
    path = _image_with_data(tmp_path / f"disk.{fmt}", fmt)
    assert inspect_image(str(path)).virtual_size == 64 << 20


def test_the_cached_debian_vmdk_passes_the_check_unmodified():
    cache = Path(os.environ.get("FERRY_CACHE_DIR", Path.home() / ".cache" / "ferry"))
    vmdks = sorted(cache.glob("guests/debian12-*/debian12.vmdk"))
    if not vmdks:
        pytest.skip("no cached debian12 guest (built by the e2e tests)")
    before = vmdks[0].stat()
    assert inspect_image(str(vmdks[0])).format == "vmdk"
    after = vmdks[0].stat()
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)


def _flat_vmdk(path: Path, extent: str) -> Path:
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW 2048 FLAT "{extent}" 0\n\n'
        'ddb.adapterType = "ide"\n'
    )
    return path


def test_a_vmdk_extent_outside_the_directory_is_refused(tmp_path: Path):
    (tmp_path / "other").mkdir()
    secret = tmp_path / "other" / "x.raw"
    secret.write_bytes(b"secret" * 200000)
    (tmp_path / "vm").mkdir()
    path = _flat_vmdk(tmp_path / "vm" / "web.vmdk", str(secret))
    e = _problem(path)
    assert e.kind == "ExtentOutsideDirectory"
    assert str(e).startswith(
        f"{path} has the extent file {secret} outside {tmp_path / 'vm'}; copy the extent"
    )
    relative = _flat_vmdk(tmp_path / "vm" / "rel.vmdk", "../other/x.raw")
    assert _problem(relative).kind == "ExtentOutsideDirectory"


def test_a_vmdk_extent_that_is_a_device_is_refused(tmp_path: Path):
    os.symlink("/dev/null", tmp_path / "dev-flat.vmdk")
    e = _problem(_flat_vmdk(tmp_path / "dev.vmdk", "/dev/null"))
    assert e.kind == "ExtentOutsideDirectory"
    e = _problem(_flat_vmdk(tmp_path / "dev2.vmdk", "dev-flat.vmdk"))
    assert e.kind == "ExtentOutsideDirectory"


def test_a_vmdk_extent_that_is_a_fifo_in_the_directory_is_refused(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe-flat.vmdk")
    e = _problem(_flat_vmdk(tmp_path / "pipe.vmdk", "pipe-flat.vmdk"))
    assert e.kind == "ExtentNotAFile"
    assert "which is not a regular file" in str(e)


def test_a_flat_vmdk_with_its_extent_in_the_directory_is_accepted(tmp_path: Path):
    (tmp_path / "web-flat.vmdk").write_bytes(b"\0" * (1 << 20))
    assert inspect_image(str(_flat_vmdk(tmp_path / "web.vmdk", "web-flat.vmdk"))).format == "vmdk"


def test_a_short_flat_extent_is_refused_as_truncated(tmp_path: Path):
    (tmp_path / "web-flat.vmdk").write_bytes(b"\0" * 4096)
    e = _problem(_flat_vmdk(tmp_path / "web.vmdk", "web-flat.vmdk"))
    assert e.kind == "CorruptImage"
    assert "flat extent web-flat.vmdk holds 4096 of 1048576 bytes" in str(e)


def test_a_symlink_loop_is_named_as_such(tmp_path: Path):
    (tmp_path / "a.raw").symlink_to(tmp_path / "b.raw")
    (tmp_path / "b.raw").symlink_to(tmp_path / "a.raw")
    assert str(_problem(tmp_path / "a.raw")) == (
        f"disk image {tmp_path / 'a.raw'} is a symlink loop; point it at the image"
    )


def test_hints_quote_paths_with_spaces(tmp_path: Path):
    path = tmp_path / "my disk.vdi"
    qemu_img("create", "-f", "vdi", str(path), "8M")
    assert f"`qemu-img convert -O qcow2 '{path}' OUT.qcow2`" in str(_problem(path))
