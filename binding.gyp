{
  "targets": [
    {
      "target_name": "vdisk_native",
      "sources": ["native/vdisk_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"]
    }
  ]
}
