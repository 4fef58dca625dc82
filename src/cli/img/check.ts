/**
 * `vdisk img check`: qemu-img check's report, JSON and exit codes.
 *
 *   vdisk img check [-q] [-f FMT] [-r leaks|all] [--output=human|json] [-U] FILENAME
 *
 * Exit codes as qemu-img: 0 consistent, 1 the check could not complete,
 * 2 corruptions, 3 leaked clusters only, 63 the format has no checks (raw).
 *
 * The image is first checked read-only. Only when -r is given and something
 * was found is it reopened writable (as QEMU's BDRV_O_CHECK: a corrupt or
 * dirty image is opened as it is, not refused or silently repaired), repaired
 * and checked again, so the report says what was found and what is left.
 */
import { FileNode } from '../../block/drivers/file.js';
import { type CheckResult, checkImage } from '../../block/drivers/qcow2/check.js';
import { Qcow2Node } from '../../block/drivers/qcow2/qcow2.js';
import { isNbdUri, probeImageFormat } from '../../block/image-name.js';
import { RbdNode, isRbdName, parseRbdFilename } from '../../block/drivers/rbd.js';
import type { BlockNode } from '../../block/node.js';
import { NbdClientNode } from '../../block/drivers/nbd.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { checkFormat } from './image.js';
import { outputFormat } from './info.js';

export const CHECK_USAGE = `Usage: vdisk img check [-q] [-f FMT] [-r leaks|all] [--output=human|json] [-U] FILENAME
`;

export async function checkCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    { f: 'value', r: 'value', output: 'value', q: 'bool', U: 'bool', 'force-share': 'bool', T: 'value' },
    CHECK_USAGE,
  );
  if (positionals.length !== 1) throw new VdiskError('EINVAL', `Expecting one image file name\n${CHECK_USAGE}`);
  const filename = positionals[0];
  const output = outputFormat(flags.output as string | undefined);
  const repair = flags.r as string | undefined;
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
    throw new VdiskError('EINVAL', `Unknown option value for -r (expecting 'leaks' or 'all'): ${repair}`);
  }
  const forceShare = Boolean(flags.U || flags['force-share']);
  if (repair && forceShare) throw new VdiskError('EINVAL', '--force-share/-U is not allowed with -r');
  const format = (flags.f as string | undefined) ?? (await probeImageFormat(filename));
  checkFormat(format);
  if (format !== 'qcow2') {
    process.stderr.write('vdisk: This image format does not support checks\n');
    return 63;
  }

  let result: CheckResult;
  let found: CheckResult | undefined;
  const first = await openForCheck(filename, true, forceShare);
  try {
    result = await checkImage(first);
  } finally {
    await first.close();
    await first.file.close();
  }
  if (repair && (result.corruptions || result.leaks)) {
    found = result;
    const node = await openForCheck(filename, false, false);
    try {
      result = await checkImage(node, { repair: repair as 'leaks' | 'all' });
      if (result.corruptions === 0) await node.markConsistent();
    } finally {
      await node.close();
      await node.file.close();
    }
    result.leaksFixed = Math.max(result.leaksFixed, found.leaks - result.leaks);
    result.corruptionsFixed = Math.max(result.corruptionsFixed, found.corruptions - result.corruptions);
  }
  for (const m of found?.messages ?? []) process.stderr.write(`${m}\n`);
  for (const m of result.messages) process.stderr.write(`${m}\n`);

  if (output === 'json') process.stdout.write(JSON.stringify(jsonReport(filename, result), null, 4) + '\n');
  else if (!flags.q) process.stdout.write(humanReport(result));
  if (result.checkErrors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

/** Opens a qcow2 image directly (not through a graph) so the check flag reaches the driver. */
async function openForCheck(filename: string, readOnly: boolean, forceShare: boolean): Promise<Qcow2Node> {
  // An NBD export or an RBD image is checked through its name as qemu-img does: the qcow2 image is its bytes.
  const file: BlockNode = isNbdUri(filename)
    ? await NbdClientNode.fromUri(filename, { nodeName: 'check-file', readOnly })
    : isRbdName(filename)
      ? await RbdNode.open(parseRbdFilename(filename), { nodeName: 'check-file', readOnly, direct: false, objects: undefined })
      : await FileNode.open({ nodeName: 'check-file', filename, readOnly, forceShare });
  try {
    return await Qcow2Node.open({ nodeName: 'check', file, backing: null, readOnly, forCheck: true }, () => {
      throw new VdiskError('EINVAL', 'check does not open backing files');
    });
  } catch (err) {
    await file.close();
    throw err;
  }
}

/** qemu-img's ImageCheck: optional members appear only when non-zero. */
function jsonReport(filename: string, r: CheckResult): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (r.imageEndOffset) out['image-end-offset'] = r.imageEndOffset;
  if (r.totalClusters) out['total-clusters'] = r.totalClusters;
  out['check-errors'] = r.checkErrors;
  if (r.leaks) out.leaks = r.leaks;
  if (r.corruptions) out.corruptions = r.corruptions;
  if (r.leaksFixed) out['leaks-fixed'] = r.leaksFixed;
  if (r.corruptionsFixed) out['corruptions-fixed'] = r.corruptionsFixed;
  if (r.allocatedClusters) out['allocated-clusters'] = r.allocatedClusters;
  if (r.fragmentedClusters) out['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) out['compressed-clusters'] = r.compressedClusters;
  out.filename = filename;
  out.format = 'qcow2';
  return out;
}

function humanReport(r: CheckResult): string {
  let s = '';
  if (r.leaksFixed || r.corruptionsFixed) {
    s +=
      'The following inconsistencies were found and repaired:\n\n' +
      `    ${r.leaksFixed} leaked clusters\n` +
      `    ${r.corruptionsFixed} corruptions\n\n` +
      'Double checking the fixed image now...\n';
  }
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    s += 'No errors were found on the image.\n';
  } else {
    if (r.corruptions) {
      s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters && r.allocatedClusters) {
    // As qemu-img: allocated of the total; fragmented and compressed of the allocated.
    const pct = (n: number, of: number) => ((n * 100) / of).toFixed(2);
    s += `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, `;
    s += `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) s += `Image end offset: ${r.imageEndOffset}\n`;
  return s;
}
