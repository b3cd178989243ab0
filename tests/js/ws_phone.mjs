// A phone in a browser's place: JsSIP (from npm), over Node's own WebSocket, registers
// USER through pinhole's WebSocket listener at URL, and prints one line per event
// (REGISTERED, REGISTRATION_FAILED <cause>, INCOMING <caller>). Node has no WebRTC, so
// JsSIP itself turns every call away with 488 ("WebRTC is not supported"): that answer
// reaching the caller proves the INVITE came down this connection and the answer went
// back up it.
// Run: node --experimental-websocket ws_phone.mjs ws://127.0.0.1:PORT alice pinhole.test alice-pw
import JsSIP from 'jssip';

// JsSIP looks for WebRTC on `window`; Node has neither.
globalThis.window = globalThis;

const receive = JsSIP.UA.prototype.receiveRequest;
JsSIP.UA.prototype.receiveRequest = function (request) {
  if (request.method === 'INVITE' && !request.to_tag) console.log(`INCOMING ${request.from.uri.user}`);
  return receive.call(this, request);
};

const [url, user, domain, password] = process.argv.slice(2);
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
ua.start();
