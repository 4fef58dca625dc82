/**
 * `vdisk img`: image tools with qemu-img's syntax, output and exit codes, so a
 * qemu-img user already knows them. One module per sub-command.
 */
import { VdiskError } from '../../errors.js';
import { BITMAP_USAGE, bitmapCommand } from './bitmap.js';
import { CHECK_USAGE, checkCommand } from './check.js';
import { COMPARE_USAGE, compareCommand } from './compare.js';
import { CONVERT_USAGE, convertCommand } from './convert.js';
import { CREATE_USAGE, createCommand } from './create.js';
import { INFO_USAGE, infoCommand } from './info.js';
import { MAP_USAGE, mapCommand } from './map.js';
import { REBASE_USAGE, rebaseCommand } from './rebase.js';
import { RESIZE_USAGE, resizeCommand } from './resize.js';
import { RESTORE_S3_USAGE, restoreS3Command } from './restore-s3.js';

const COMMANDS: Record<string, { run: (argv: string[]) => Promise<number>; usage: string }> = {
  bitmap: { run: bitmapCommand, usage: BITMAP_USAGE },
  check: { run: checkCommand, usage: CHECK_USAGE },
  compare: { run: compareCommand, usage: COMPARE_USAGE },
  convert: { run: convertCommand, usage: CONVERT_USAGE },
  create: { run: createCommand, usage: CREATE_USAGE },
  info: { run: infoCommand, usage: INFO_USAGE },
  map: { run: mapCommand, usage: MAP_USAGE },
  rebase: { run: rebaseCommand, usage: REBASE_USAGE },
  resize: { run: resizeCommand, usage: RESIZE_USAGE },
  'restore-s3': { run: restoreS3Command, usage: RESTORE_S3_USAGE },
};

export const IMG_USAGE = `Usage: vdisk img <command> [options]

Commands (qemu-img's syntax; formats raw and qcow2):
${Object.values(COMMANDS)
  .map((c) => '  ' + c.usage.split('\n')[0].replace(/^Usage: vdisk img /, ''))
  .join('\n')}
`;

export async function imgCommand(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === 'help' || name === '--help' || name === '-h') {
    process.stdout.write(IMG_USAGE);
    return name === undefined ? 1 : 0;
  }
  const command = COMMANDS[name];
  if (!command) {
    process.stderr.write(`vdisk img: unknown command '${name}'\n${IMG_USAGE}`);
    return 1;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    if (err instanceof VdiskError && err.code === 'VDISK_USAGE') {
      process.stdout.write(err.message);
      return 0;
    }
    throw err;
  }
}
