// A browser softphone that talks: headless Chromium (Debian's, driven by playwright-core)
// opens phone.html, served by this script on 127.0.0.1, registers USER over the WebSocket
// URL, and takes commands on stdin, one per line: `call URI`, `hangup`, `hold`, `unhold`,
// `restart` (an ICE restart).
// Calls coming in are answered. Its microphone is TONE (a WAV file); it prints the page's
// events, one per line (REGISTERED, INCOMING <user>, CONFIRMED, ICE <state>, HOLD, ENDED,
// PEAK <hz> <dB>: the loudest frequency of what it hears, twice a second).
// Run: node browser_call.mjs wss://HOST:PORT alice pinhole.test alice-pw TONE.wav
import { chromium } from 'playwright-core';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { jssipBundle } from './jssip_bundle.mjs';

const [url, user, domain, password, tone] = process.argv.slice(2);
const jssip = jssipBundle();
const html = readFileSync(new URL('./phone.html', import.meta.url));
const server = createServer((req, res) => {
  if (req.url === '/jssip.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' });
    res.end(jssip);
  } else {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(html);
  }
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--ignore-certificate-errors',
    '--disable-breakpad',
    '--use-fake-ui-for-media-stream',
    '--use-fake-device-for-media-stream',
    `--use-file-for-fake-audio-capture=${tone}`,
    '--autoplay-policy=no-user-gesture-required',
  ],
});
const page = await browser.newPage();
page.on('console', (m) => console.log(m.text()));
page.on('pageerror', (e) => console.log(`PAGE_ERROR ${e.message}`));
await page.goto(`http://127.0.0.1:${server.address().port}/`);
await page.evaluate((cfg) => window.phone.start(cfg), { url, user, domain, password });
const lines = createInterface({ input: process.stdin });
lines.on('line', async (line) => {
  const [cmd, arg] = line.trim().split(/\s+/);
  try {
    if (cmd === 'call') await page.evaluate((t) => window.phone.call(t), arg);
    else if (['hangup', 'hold', 'unhold', 'restart'].includes(cmd)) await page.evaluate((c) => window.phone[c](), cmd);
  } catch (e) {
    console.log(`COMMAND_ERROR ${cmd} ${e.message}`);
  }
});
const stop = async () => {
  await browser.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
lines.on('close', () => {});
await new Promise(() => {});
