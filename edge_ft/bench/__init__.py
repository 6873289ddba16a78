"""Measuring on (or as) the device: device profiles, confined runs that emulate a profile, CPU calibration.

  profiles   device_profiles/*.toml -> DeviceProfile (validated; found by name or by path)
  cgroups    creating, filling and removing the cgroups one confined run lives in (v1, and v2 where present)
  emulate    run_confined(argv, profile): a child process under the profile's memory, core and speed limits
  calibrate  a fixed numpy workload whose timing gives this machine's speed relative to the reference core

Torch-free: everything here also runs on the device itself.
"""
