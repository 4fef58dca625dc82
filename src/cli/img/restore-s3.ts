/**
 * `vdisk img restore-s3`: rebuilds an image from a backup that x-backup-s3
 * stored in an S3 bucket, verifying every chunk (src/backup/s3/restore.ts),
 * or with --verify-only checks every chunk object without writing anything.
 *
 * Credentials come from --access-key and --secret-file, or from the
 * environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as the AWS tools
 * take them; a secret on the command line would be in every `ps` listing.
 *
 * A restore that fails verification removes the image it was writing: a
 * file that looks like a good image but is not is worse than none. The
 * exit status is 1, and the message lists the chunks at fault.
 */
import fs from 'node:fs';
import { createImageFile } from '../../block/create.js';
import { S3Client } from '../../backup/s3/client.js';
import { normalisePrefix } from '../../backup/s3/manifest.js';
import { fetchChunk, restoreManifest } from '../../backup/s3/restore.js';
import { loadManifest } from '../../backup/s3/s3-backup.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { Progress, checkFormat, openImage } from './image.js';

export const RESTORE_S3_USAGE = `Usage: vdisk img restore-s3 [-q] [-p] [-O FMT] --endpoint URL --bucket NAME [--prefix PREFIX]
         [--region REGION] [--access-key KEY] [--secret-file FILE] [--ca-file PEM] [--manifest KEY] OUTPUT
       vdisk img restore-s3 --verify-only ... (no OUTPUT)

Rebuilds OUTPUT (raw or qcow2, new) from the backup whose manifest is KEY (default: the one
PREFIX/latest.json names), checking each chunk's SHA-256 as it arrives and the whole image
after it is written. Keys default to AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. An https
endpoint is checked against the system's CAs, or against those in --ca-file.
`;

export async function restoreS3Command(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    { q: 'bool', p: 'bool', O: 'value', endpoint: 'value', bucket: 'value', prefix: 'value', region: 'value', 'access-key': 'value', 'secret-file': 'value', 'ca-file': 'value', manifest: 'value', 'verify-only': 'bool' },
    RESTORE_S3_USAGE,
  );
  const verifyOnly = flags['verify-only'] === true;
  if (positionals.length !== (verifyOnly ? 0 : 1)) throw new VdiskError('EINVAL', `${verifyOnly ? '--verify-only takes no output file' : 'Expecting one output file name'}\n${RESTORE_S3_USAGE}`);
  for (const required of ['endpoint', 'bucket']) {
    if (typeof flags[required] !== 'string') throw new VdiskError('EINVAL', `--${required} is required\n${RESTORE_S3_USAGE}`);
  }
  const accessKey = (flags['access-key'] as string | undefined) ?? process.env.AWS_ACCESS_KEY_ID;
  let secretKey = process.env.AWS_SECRET_ACCESS_KEY;
  if (typeof flags['secret-file'] === 'string') {
    try {
      secretKey = fs.readFileSync(flags['secret-file'], 'utf8').trim();
    } catch (err) {
      throw new VdiskError('ENOENT', `cannot read the secret key from ${flags['secret-file']}: ${(err as Error).message}`);
    }
  }
  if (!accessKey || !secretKey) throw new VdiskError('EINVAL', 'S3 credentials are needed: --access-key and --secret-file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
  const format = (flags.O as string | undefined) ?? 'raw';
  checkFormat(format);
  const prefix = normalisePrefix(flags.prefix as string | undefined);
  let ca: Buffer | undefined;
  if (typeof flags['ca-file'] === 'string') {
    try {
      ca = fs.readFileSync(flags['ca-file']);
    } catch (err) {
      throw new VdiskError('ENOENT', `cannot read CA certificates from ${flags['ca-file']}: ${(err as Error).message}`);
    }
  }
  const client = new S3Client({ endpoint: flags.endpoint as string, bucket: flags.bucket as string, region: flags.region as string | undefined, credentials: { accessKey, secretKey }, ca });
  const quiet = flags.q === true;
  const progress = new Progress(flags.p === true && !quiet);
  try {
    const { manifest, key } = await loadManifest(client, prefix, flags.manifest as string | undefined);
    if (verifyOnly) {
      const problems: string[] = [];
      for (const [i, c] of manifest.chunks.entries()) {
        await fetchChunk(client, c).catch((err: Error) => problems.push(err.message));
        progress.update(i + 1, manifest.chunks.length);
      }
      progress.finish();
      if (problems.length) throw new VdiskError('EIO', `backup ${manifest.id} (${key}): ${problems.length} of ${manifest.chunks.length} chunk(s) failed verification:\n${problems.map((p) => `  ${p}`).join('\n')}`);
      if (!quiet) process.stdout.write(`backup ${manifest.id} (${key}): all ${manifest.chunks.length} chunks verified\n`);
      return 0;
    }
    const output = positionals[0];
    if (fs.existsSync(output)) throw new VdiskError('EEXIST', `${output} exists: restore-s3 writes a new image and will not overwrite one`);
    await createImageFile({ format, filename: output, size: manifest.size });
    try {
      const img = await openImage(output, { format });
      try {
        const r = await restoreManifest(client, manifest, img.node, (done, total) => progress.update(done, total));
        progress.finish();
        if (!quiet) process.stdout.write(`restored backup ${manifest.id} (${key}) into ${output}: ${manifest.size} bytes, ${r.chunks} data chunks, every chunk verified\n`);
      } finally {
        await img.close();
      }
    } catch (err) {
      fs.rmSync(output, { force: true });
      const e = err instanceof VdiskError ? err : new VdiskError('EIO', (err as Error).message);
      throw new VdiskError(e.errno, `${e.message}\n${output} was removed: it does not hold the backup`);
    }
    return 0;
  } finally {
    client.close();
  }
}
