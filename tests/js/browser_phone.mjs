// A browser softphone: headless Chromium (Debian's, driven by playwright-core) runs JsSIP
// in a page, registers USER over the WebSocket URL and prints one line per event, as
// ws_phone.mjs does (REGISTERED, REGISTRATION_FAILED <cause>, INCOMING <caller>). Calls
// are turned away with 486 from the page for now: the answer reaching the caller proves
// the INVITE came down the browser's connection and the answer went back up it.
// Run: node browser_phone.mjs wss://127.0.0.1:PORT alice pinhole.test alice-pw
import { chromium } from 'playwright-core';
import { jssipBundle } from './jssip_bundle.mjs';

const jssip = jssipBundle();
const [url, user, domain, password] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--ignore-certificate-errors', '--disable-breakpad'],
});
const page = await browser.newPage();
page.on('console', (m) => console.log(m.text()));
await page.addScriptTag({ content: jssip });
await page.evaluate(
  ({ url, user, domain, password }) => {
    const ua = new JsSIP.UA({
      sockets: [new JsSIP.WebSocketInterface(url)],
      uri: `sip:${user}@${domain}`,
      password,
      register: true,
      register_expires: 600,
      session_timers: false,
    });
    ua.on('registered', () => console.log('REGISTERED'));
    ua.on('registrationFailed', (e) => console.log(`REGISTRATION_FAILED ${e.cause}`));
    ua.on('newRTCSession', (e) => {
      if (e.originator !== 'remote') return;
      console.log(`INCOMING ${e.request.from.uri.user}`);
      e.session.terminate({ status_code: 486, reason_phrase: 'Busy Here' });
    });
    ua.start();
  },
  { url, user, domain, password },
);
// Lives until the test stops it.
process.on('SIGTERM', async () => {
  await browser.close();
  process.exit(0);
});
await new Promise(() => {});
