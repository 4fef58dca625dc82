{
  "variables": {
    "have_librbd": "<!(test -f /usr/include/rbd/librbd.h && test -f /usr/include/rados/librados.h && echo 1 || echo 0)"
  },
  "targets": [
    {
      "target_name": "vdisk_native",
      "sources": ["native/vdisk_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"]
    }
  ],
  "conditions": [
    ["have_librbd==1", {
      "targets": [
        {
          "target_name": "vdisk_rbd",
          "sources": ["native/rbd.c"],
          "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
          "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"],
          "libraries": ["-lrbd", "-lrados"]
        }
      ]
    }]
  ]
}
