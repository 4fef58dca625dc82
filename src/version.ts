/** vdisk's version, and the QEMU version whose interfaces it follows (reported by query-version). */
export const VERSION = '0.1.0';
export const QEMU_COMPAT_VERSION = { major: 7, minor: 2, micro: 0 };
