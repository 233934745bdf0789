// Kiln's warm build process: `vite build --watch` driven through Vite's own API, so that the
// agent learns exactly when a rebuild that includes its changes ends, and which files the build
// read. Runs inside the build sandbox as the project's build user.
//
//   node warm.mjs <vite package dir> <root> <base> <outDir> <src>
//
// <root> is this process's own copy of the project, which Vite may write to; <src> is the
// checkout, read-only. The agent asks on stdin, one JSON line per request, for changed files to
// be copied from <src> into <root>:
//   {"cmd":"apply","files":[<paths relative to root>]}
// Everything Vite and the project's plugins print goes to stdout and stderr as usual; events for
// the agent are single lines `\x1ekiln:<json>` on stdout, in the order this (single) JavaScript
// thread saw them:
//   {"ev":"applied"} or {"ev":"applied","error":<text>}   the files are written
//   {"ev":"change","id":<path relative to root>}            the bundler's watchChange hook
//   {"ev":"start"}                                          its buildStart hook
//   {"ev":"error","message":<text>}
//   {"ev":"end","ms":<ms since start>,"files":[<paths the build read, relative to root>],
//    "out":<the build's output directory, under outDir, or null>}
// Both hooks are awaited by the bundler, and the copy runs on this thread in one go: a build
// whose start comes after "applied", and after a change of each file, read what was written.
// Vite writes to <outDir>/build; at the end of each build its output is renamed to
// <outDir>/done-<n>, in the end handler, before the next build can write: a rebuild that
// follows (a second event for one write) never changes an output the agent is publishing.
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join, relative, sep } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const [viteDir, root, base, outDir, src] = process.argv.slice(2);
const emit = (event) => process.stdout.write('\x1ekiln:' + JSON.stringify(event) + '\n');
const rel = (id) => relative(root, id.split('?')[0]);

let started = Date.now();
let running = false;
let rolldown = false;
let builds = 0;
const building = join(outDir, 'build');
const start = () => {
  if (!running) {
    running = true;
    started = Date.now();
    emit({ ev: 'start' });
  }
};

// The files the last build read: module ids and, where the bundler has them, watched files (a
// CSS file's Tailwind content, say). Only these can be rebuilt incrementally by the agent.
let files = new Set();
const inputs = {
  name: 'kiln-inputs',
  enforce: 'post',
  buildStart() {
    rolldown = Boolean(this.meta?.rolldownVersion);
    start();
  },
  watchChange(id) {
    emit({ ev: 'change', id: rel(id) });
  },
  buildEnd() {
    const seen = new Set();
    const add = (id) => {
      if (typeof id !== 'string' || !id.startsWith(root + sep)) return;
      const r = rel(id);
      if (!r.startsWith('node_modules' + sep)) seen.add(r);
    };
    for (const id of this.getModuleIds?.() ?? []) add(id);
    for (const id of this.getWatchFiles?.() ?? []) add(id);
    files = seen;
  },
};

// By rename under Rolldown (one event, never a half-written file); in place under Rollup,
// whose chokidar (Vite 5) stops watching a file replaced by a rename. A build running meanwhile
// may read a file half written; it started before "applied", so the agent does not take it.
const apply = (paths) => {
  for (const p of paths) {
    const from = join(src, p);
    const to = join(root, p);
    mkdirSync(dirname(to), { recursive: true });
    const st = lstatSync(from);
    if (st.isSymbolicLink() || rolldown) {
      const tmp = join(dirname(to), '.kiln-warm-' + basename(to));
      rmSync(tmp, { force: true });
      if (st.isSymbolicLink()) symlinkSync(readlinkSync(from), tmp);
      else writeFileSync(tmp, readFileSync(from), { mode: st.mode & 0o777 });
      renameSync(tmp, to);
    } else {
      writeFileSync(to, readFileSync(from));
      chmodSync(to, st.mode & 0o777);
    }
  }
};
// The finished build's output, moved out of the way of the next one.
const finish = () => {
  try {
    if (!existsSync(building)) return null;
    const out = `done-${++builds}`;
    renameSync(building, join(outDir, out));
    return out;
  } catch (err) {
    console.error(`kiln: keeping the build's output: ${err?.message ?? err}`);
    return null;
  }
};
createInterface({ input: process.stdin }).on('line', (line) => {
  let req;
  try {
    req = JSON.parse(line);
  } catch {
    return;
  }
  if (req?.cmd !== 'apply' || !Array.isArray(req.files)) return;
  try {
    apply(req.files);
    emit({ ev: 'applied' });
  } catch (err) {
    emit({ ev: 'applied', error: String(err?.message ?? err) });
  }
});

const describe = (err = {}) => {
  const where = err.loc ? `${err.loc.file ?? err.id ?? ''}:${err.loc.line}:${err.loc.column}` : err.id ?? '';
  const text = [err.plugin ? `[${err.plugin}] ${err.message}` : String(err.message ?? err), where, err.frame]
    .filter(Boolean)
    .join('\n');
  return text.slice(0, 4000);
};
const failed = (err) => {
  start();
  console.error(describe(err));
  emit({ ev: 'error', message: describe(err) });
  emit({ ev: 'end', ms: Date.now() - started, files: [], out: null });
  process.exit(1);
};

// A config that does not load, or a Vite without this API, fails the first build.
let watcher;
try {
  const { build } = await import(pathToFileURL(join(viteDir, 'dist/node/index.js')).href);
  watcher = await build({
    root,
    base,
    plugins: [inputs],
    build: { outDir: building, emptyOutDir: true, watch: {} },
  });
} catch (err) {
  failed(err);
}
if (typeof watcher?.on !== 'function') failed(new Error('vite build --watch did not return a watcher'));
watcher.on('event', (e) => {
  switch (e.code) {
    case 'ERROR':
      start();
      emit({ ev: 'error', message: describe(e.error) });
      break;
    case 'END':
      start();
      running = false;
      emit({ ev: 'end', ms: Date.now() - started, files: [...files], out: finish() });
      break;
  }
  e.result?.close?.();
});
