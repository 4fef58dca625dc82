/**
 * NBD wire constants, spelled as in the protocol document (doc/proto.md of
 * NetworkBlockDevice/nbd), so grep against the spec works. No I/O here.
 */
import type { Errno } from '../errors.js';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
// Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests and replies with 64-bit lengths.
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags.
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const NBD_REP_FLAG_ERROR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;
export const NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR + 10;

// Info types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const CMD_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
/** Extended headers: the length field is a payload that follows (WRITE), not an effect length. */
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// Structured reply.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Extended headers' block status: 64-bit extent lengths and status, with a descriptor count. */
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = 2 ** 15 + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 2 ** 15 + 2;

// base:allocation extent flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
// qemu:dirty-bitmap:NAME extent flag.
export const NBD_STATE_DIRTY = 1 << 0;

// Error values on the wire.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Maps a vdisk errno to the NBD error value (the one table; as nbdkit's nbd_errno). */
export function nbdErrno(errno: Errno): number {
  switch (errno) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_EPERM;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
      return NBD_EINVAL;
    case 'ENOSPC':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EOVERFLOW':
      return NBD_EOVERFLOW;
    case 'ENOTSUP':
      return NBD_ENOTSUP;
    case 'ESHUTDOWN':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EIO;
  }
}

/** Size limits. */
export const NBD_MAX_STRING = 4096;
/** Largest READ/WRITE payload accepted (QEMU's and nbdkit's limit). */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Option data larger than this gets NBD_REP_ERR_TOO_BIG and is skipped unread. */
export const NBD_MAX_OPTION_LENGTH = 64 * 1024;

// Meta contexts (the names QEMU publishes; docs/interop/nbd.txt in qemu/qemu).
export const BASE_ALLOCATION = 'base:allocation';
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const QEMU_DIRTY_BITMAP = 'qemu:dirty-bitmap:';
