"""envelope.json's hardware block from the one hardware detection (scaling/hardware.py)."""

from scaler_wizard.run_record import hardware_inventory
from scaler_wizard.scaling.hardware import GpuInfo, HardwareProfile, detect_hardware, hardware_record


def test_same_keys_and_values_as_the_run_records_inventory():
    assert hardware_record() == hardware_inventory()


def test_gpus_come_from_the_profile_without_device_queries():
    profile = HardwareProfile(accelerator="cuda", cpu_cores=8, ram_total_gb=64.0,
                              gpus=[GpuInfo(index=0, name="H100", total_memory_gb=79.19)])
    record = hardware_record(profile)
    assert record["cuda_devices"] == [{"name": "H100", "total_gb": 79.19}]
    assert record["cpu_count"] == 8 and record["ram_total_gb"] == 64.0
    quiet = detect_hardware(query_devices=False)
    assert all(g.free_memory_gb is None and g.bf16 is None for g in quiet.gpus)
