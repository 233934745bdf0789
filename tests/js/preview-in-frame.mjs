// Opens a generator-like parent page that frames a preview, in Debian's Chromium, and reports
// what a generator would see: the app rendered inside the frame, and the messages Kiln's console
// script posted to the parent. A second parent, on an origin the preview's frame-ancestors does not
// allow, shows whether the browser refuses to frame the preview.
//
// Usage: node preview-in-frame.mjs '<json>' with {previewUrl, parentPort, expectText, wantMessages,
// blockedHost}. Prints one JSON report on stdout; exits 1 (with the report) when something a
// generator relies on is missing.
import http from 'node:http'
import { chromium } from 'playwright-core'

const cfg = JSON.parse(process.argv[2])
const TIMEOUT = 30_000

function parentPage(previewUrl) {
  return `<!doctype html><meta charset="utf-8"><title>generator</title>
<script>
  window.kilnMessages = [];
  window.frameLoaded = false;
  addEventListener('message', (e) => {
    if (e.data && e.data.kiln === 1) window.kilnMessages.push({ origin: e.origin, data: e.data });
  });
</script>
<iframe id="preview" src="${previewUrl}" width="800" height="600" onload="window.frameLoaded = true"></iframe>`
}

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' })
  res.end(parentPage(cfg.previewUrl))
})
await new Promise((resolve, reject) => {
  server.once('error', reject)
  server.listen(cfg.parentPort, '127.0.0.1', resolve)
})

const report = { ok: false, allowed: {}, blocked: {} }
let browser
try {
  browser = await chromium.launch({
    executablePath: process.env.KILN_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--no-first-run',
      // The blocked parent's host name, served by the same loopback server.
      `--host-resolver-rules=MAP ${cfg.blockedHost} 127.0.0.1`,
    ],
    timeout: TIMEOUT,
  })
  const context = await browser.newContext()

  const open = async (parentUrl, into) => {
    const page = await context.newPage()
    into.parentUrl = parentUrl
    into.parentConsole = []
    page.on('console', (m) => into.parentConsole.push(m.text()))
    await page.goto(parentUrl, { timeout: TIMEOUT })
    await page.waitForFunction(() => window.frameLoaded, null, { timeout: TIMEOUT })
    const frame = await (await page.$('#preview')).contentFrame()
    return { page, frame }
  }
  const frameText = async (frame) =>
    frame ? frame.evaluate(() => document.body ? document.body.innerText : '').catch(() => '') : ''
  const messages = (page) => page.evaluate(() => window.kilnMessages)

  // An allowed parent: the app renders in the frame and its console reaches the parent.
  {
    const r = report.allowed
    const { page, frame } = await open(`http://127.0.0.1:${cfg.parentPort}/`, r)
    r.frameUrl = frame ? frame.url() : null
    try {
      await frame.waitForFunction(
        (want) => (document.getElementById('root')?.innerText || '').includes(want),
        cfg.expectText, { timeout: TIMEOUT })
    } catch (e) {
      r.renderError = String(e.message || e).split('\n')[0]
    }
    r.frameText = await frameText(frame)
    try {
      await page.waitForFunction((want) => want.every(([type, text]) => window.kilnMessages.some(
        (m) => m.data.type === type && JSON.stringify(m.data).includes(text))),
        cfg.wantMessages, { timeout: TIMEOUT })
    } catch (e) {
      r.messageError = String(e.message || e).split('\n')[0]
    }
    r.messages = await messages(page)
    await page.close()
  }

  // A parent on an origin frame-ancestors leaves out: the browser must not show the app there.
  {
    const r = report.blocked
    const { page, frame } = await open(`http://${cfg.blockedHost}:${cfg.parentPort}/`, r)
    // Give a framed app the time it would need to render and post.
    await page.waitForTimeout(1500)
    r.frameUrl = frame ? frame.url() : null
    r.frameText = await frameText(frame)
    r.messages = await messages(page)
    await page.close()
  }
  report.ok = true
} catch (e) {
  report.error = String(e.stack || e)
} finally {
  if (browser) await browser.close()
  server.close()
}
console.log(JSON.stringify(report))
process.exit(report.ok ? 0 : 1)
