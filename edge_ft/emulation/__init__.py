"""Emulating a board on this machine: device profiles and confined runs under their memory, core and speed limits.

  profiles   device_profiles/*.toml -> DeviceProfile (validated; found by name or by path)
  cgroups    creating, filling and removing the cgroups one confined run lives in (v1, and v2 where present)
  enter      the confined child's first program: joins the cgroups (or sets rlimits), then execs the job
  emulate    run_confined(argv, profile): a child process under the profile's memory, core and speed limits
  cpu        thread-pool variables and the CFS quota period a confined child gets
  calibrate  a fixed numpy workload whose timing gives this machine's speed relative to the reference core
  hostspeed  this machine's speed and CFS throttling loss, measured once and cached, turned into CPU quotas
  check      how well this machine emulates each board, as measured figures (`edge-ft profile check`)
  check_train  whether an emulated board gives the same training answer twice (`--workload train`)
  lifetime   child processes that die with their parent, and cgroups removed after them

Torch-free and independent of the measured runs (edge_ft.bench), which use it, as do `edge-ft train
--profile` and the fleet's confined SuperNodes.
"""
