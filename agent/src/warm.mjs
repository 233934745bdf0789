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
// the agent are single lines `\x1ekiln:<json>` on stdout:
//   {"ev":"applied","files":{<path>:<inode written, as a decimal string>}} or {"ev":"applied","error":<text>}
//   {"ev":"change","id":<path relative to root>,"ino":<inode as a decimal string, "" if gone>}
//   {"ev":"start"}
//   {"ev":"error","message":<text>}
//   {"ev":"end","ms":<ms since start>,"files":[<paths the build read, relative to root>]}
// A change is reported after the file was looked at, with the inode it has then: the agent counts
// a change as seen only when the inode is the one written for it.
import {
  chmodSync,
  copyFileSync,
  lstatSync,
  mkdirSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
} from 'node:fs';
import { basename, dirname, join, relative, sep } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const [viteDir, root, base, outDir, src] = process.argv.slice(2);
const emit = (event) => process.stdout.write('\x1ekiln:' + JSON.stringify(event) + '\n');

// The files the last build read: module ids and, where the bundler has them, watched files (a
// CSS file's Tailwind content, say). Only these can be rebuilt incrementally by the agent.
let files = new Set();
const inputs = {
  name: 'kiln-inputs',
  enforce: 'post',
  buildEnd() {
    const seen = new Set();
    const add = (id) => {
      if (typeof id !== 'string' || !id.startsWith(root + sep)) return;
      const rel = relative(root, id.split('?')[0]);
      if (!rel.startsWith('node_modules' + sep)) seen.add(rel);
    };
    for (const id of this.getModuleIds?.() ?? []) add(id);
    for (const id of this.getWatchFiles?.() ?? []) add(id);
    files = seen;
  },
};

let started = Date.now();
let running = false;
const start = () => {
  if (!running) {
    running = true;
    started = Date.now();
    emit({ ev: 'start' });
  }
};

// Each file by rename, so the watcher sees one new file, never a half-written one.
const apply = (files) => {
  const written = {};
  for (const rel of files) {
    const from = join(src, rel);
    const to = join(root, rel);
    const tmp = join(dirname(to), '.kiln-warm-' + basename(to));
    mkdirSync(dirname(to), { recursive: true });
    rmSync(tmp, { force: true });
    const st = lstatSync(from);
    if (st.isSymbolicLink()) {
      symlinkSync(readlinkSync(from), tmp);
    } else {
      copyFileSync(from, tmp);
      chmodSync(tmp, st.mode & 0o777);
    }
    renameSync(tmp, to);
    written[rel] = lstatSync(to, { bigint: true }).ino.toString();
  }
  return written;
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
    emit({ ev: 'applied', files: apply(req.files) });
  } catch (err) {
    emit({ ev: 'applied', error: String(err?.message ?? err) });
  }
});

const failed = (err) => {
  start();
  console.error(describe(err));
  emit({ ev: 'error', message: describe(err) });
  emit({ ev: 'end', ms: Date.now() - started, files: [] });
  process.exit(1);
};
const describe = (err = {}) => {
  const where = err.loc ? `${err.loc.file ?? err.id ?? ''}:${err.loc.line}:${err.loc.column}` : err.id ?? '';
  const text = [err.plugin ? `[${err.plugin}] ${err.message}` : String(err.message ?? err), where, err.frame]
    .filter(Boolean)
    .join('\n');
  return text.slice(0, 4000);
};

// A config that does not load, or a Vite without this API, fails the first build.
let watcher;
try {
  const { build } = await import(pathToFileURL(join(viteDir, 'dist/node/index.js')).href);
  watcher = await build({
    root,
    base,
    plugins: [inputs],
    build: { outDir, emptyOutDir: true, watch: {} },
  });
} catch (err) {
  failed(err);
}
if (typeof watcher?.on !== 'function') failed(new Error('vite build --watch did not return a watcher'));
watcher.on('change', (id) => {
  let ino = '';
  try {
    ino = statSync(id, { bigint: true }).ino.toString();
  } catch {}
  emit({ ev: 'change', id: relative(root, id), ino });
});
watcher.on('event', (e) => {
  switch (e.code) {
    case 'START':
      start();
      break;
    case 'ERROR':
      start();
      emit({ ev: 'error', message: describe(e.error) });
      break;
    case 'END':
      start();
      running = false;
      emit({ ev: 'end', ms: Date.now() - started, files: [...files] });
      break;
  }
  e.result?.close?.();
});
