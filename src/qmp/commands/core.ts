/** query-version, query-commands, quit. */
import { struct } from '../../qapi/schema.js';
import { QMP_VERSION, type QmpCommand } from '../server.js';

const NONE = struct('NoArguments', {});

export const CORE_COMMANDS: QmpCommand[] = [
  { name: 'query-version', args: NONE, run: () => QMP_VERSION },
  {
    name: 'query-commands',
    args: NONE,
    run: (_a, { server }) => server.commandNames().map((name) => ({ name })),
  },
  {
    name: 'quit',
    args: NONE,
    // The reply goes out first; the daemon then shuts down as on SIGTERM.
    run: (_a, { server }) => {
      setImmediate(() => server.onQuit());
      return {};
    },
  },
];
