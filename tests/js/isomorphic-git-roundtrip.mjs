// Pushes a commit with isomorphic-git, then clones it back: the client browser generators use.
import git from 'isomorphic-git'
import http from 'isomorphic-git/http/node'
import fs from 'node:fs'
const [url, token, dir] = process.argv.slice(2)
const onAuth = () => ({ username: 'kiln', password: token })
const author = { name: 'iso', email: 'iso@kiln.test' }
fs.mkdirSync(dir + '/src/src', { recursive: true })
await git.init({ fs, dir: dir + '/src', defaultBranch: 'main' })
fs.writeFileSync(dir + '/src/src/main.js', 'console.log("iso")\n')
await git.add({ fs, dir: dir + '/src', filepath: 'src/main.js' })
const oid = await git.commit({ fs, dir: dir + '/src', message: 'from isomorphic-git', author })
const pushed = await git.push({ fs, http, dir: dir + '/src', url, ref: 'main', onAuth })
if (!pushed.ok) throw new Error('push failed: ' + JSON.stringify(pushed))
await git.clone({ fs, http, dir: dir + '/clone', url, onAuth, singleBranch: true })
const head = await git.resolveRef({ fs, dir: dir + '/clone', ref: 'HEAD' })
if (head !== oid) throw new Error(`clone HEAD ${head} != pushed ${oid}`)
console.log(JSON.stringify({ pushed: oid, cloned: head }))
