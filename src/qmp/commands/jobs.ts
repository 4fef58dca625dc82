/** query-jobs and the job-* verbs (any job type). */
import { str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

const ID = struct('JobId', { id: str });

export const JOB_COMMANDS: QmpCommand[] = [
  { name: 'query-jobs', args: struct('query-jobs', {}), run: (_a, { daemon }) => daemon.jobs.list().map((j) => j.info()) },
  { name: 'job-pause', args: ID, run: (a, { daemon }) => (daemon.jobs.find(a.id as string).pause(), {}) },
  { name: 'job-resume', args: ID, run: (a, { daemon }) => (daemon.jobs.find(a.id as string).resume(), {}) },
  { name: 'job-cancel', args: ID, run: (a, { daemon }) => (daemon.jobs.find(a.id as string).cancel(), {}) },
  {
    name: 'job-complete',
    args: ID,
    run: (a, { daemon }) => (daemon.jobs.find(a.id as string).checkVerb('complete'), {}),
  },
  {
    name: 'job-finalize',
    args: ID,
    run: async (a, { daemon }) => {
      await daemon.jobs.find(a.id as string).finalize();
      return {};
    },
  },
  { name: 'job-dismiss', args: ID, run: (a, { daemon }) => (daemon.jobs.find(a.id as string).dismiss(), {}) },
];
