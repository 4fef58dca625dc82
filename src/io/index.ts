/**
 * The qemu-io command interpreter (QEMU 7.2's commands, options and output)
 * over any BlockNode: `vdisk io` uses it, and so can a monitor command.
 */
export { BDRV_REQUEST_MAX_BYTES, type IoCommandOptions, type Output, ioCommandNames, runIoCommand } from './commands.js';
export { cvtstr, dumpBuffer, printReport, printfFixed, timestr } from './format.js';
export { cvtnum, getopt, parsePattern, splitCommandLine } from './parse.js';
