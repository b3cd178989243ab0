// JsSIP's npm package has no browser build: this bundles it for a page (esbuild, in
// memory), as the global `JsSIP`.
import { buildSync } from 'esbuild';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

export function jssipBundle() {
  return buildSync({
    entryPoints: [require.resolve('jssip')],
    bundle: true,
    globalName: 'JsSIP',
    platform: 'browser',
    write: false,
  }).outputFiles[0].text;
}
