/**
 * The QMP command table: one module per area, each a list of commands with
 * their argument schema and handler. A later capability adds its module here.
 */
import type { QmpCommand } from '../server.js';
import { BACKUP_COMMANDS } from './backup.js';
import { BITMAP_COMMANDS } from './bitmaps.js';
import { BLKDEBUG_COMMANDS } from './blkdebug.js';
import { BLOCK_COMMANDS } from './block.js';
import { CORE_COMMANDS } from './core.js';
import { EXPORT_COMMANDS } from './exports.js';
import { HMP_COMMANDS } from './hmp.js';
import { JOB_COMMANDS } from './jobs.js';
import { NBD_COMMANDS } from './nbd.js';
import { SCHEMA_COMMANDS } from './schema.js';
import { STATS_COMMANDS } from './stats.js';

export const QMP_COMMANDS: QmpCommand[] = [...CORE_COMMANDS, ...BLOCK_COMMANDS, ...BITMAP_COMMANDS, ...NBD_COMMANDS, ...EXPORT_COMMANDS, ...JOB_COMMANDS, ...BACKUP_COMMANDS, ...HMP_COMMANDS, ...BLKDEBUG_COMMANDS, ...STATS_COMMANDS, ...SCHEMA_COMMANDS];
