// Command dex-bitbucket is dex's own server with the `bitbucket-connector`
// connector type registered beside dex's built-in ones.
//
//	dex-bitbucket serve CONFIG   serve dex with that config until SIGTERM/SIGINT
//	dex-bitbucket check-config CONFIG
//	dex-bitbucket version        this build and the dex it embeds
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/dexidp/dex/server"

	bbconnector "github.com/bitbucket-connector/bitbucket-connector/dex/connector"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage:
  dex-bitbucket serve CONFIG         serve dex with CONFIG (a dex config file) until SIGTERM/SIGINT
  dex-bitbucket check-config CONFIG  print every problem of CONFIG (path: reason) and exit 1, or exit 0
  dex-bitbucket version              print this build's version and the dex it embeds
`

func main() {
	bbconnector.Register(server.ConnectorsConfig)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "version", "--version":
		fmt.Fprintf(stdout, "dex-bitbucket %s (dex %s)\n", version, dexVersion())
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "serve", "check-config":
		if len(args) != 2 {
			fmt.Fprintf(stderr, "dex-bitbucket %s: expected one argument, the config file\n%s", args[0], usage)
			return 2
		}
		c, err := loadConfig(args[1])
		if err != nil {
			if probs, ok := err.(Problems); ok {
				for _, p := range probs {
					fmt.Fprintf(stderr, "%s: %s\n", args[1], p)
				}
			} else {
				fmt.Fprintf(stderr, "%s: %v\n", args[1], err)
			}
			return 1
		}
		if args[0] == "check-config" {
			fmt.Fprintf(stdout, "%s: ok (issuer %s, %d connector(s), storage %s)\n", args[1], c.Issuer, len(c.Connectors), c.Storage.Type)
			return 0
		}
		if err := serve(c); err != nil {
			fmt.Fprintf(stderr, "dex-bitbucket: %v\n", err)
			return 1
		}
		return 0
	default:
		fmt.Fprintf(stderr, "dex-bitbucket: unknown command %q\n%s", args[0], usage)
		return 2
	}
}

// dexVersion is the dex module version this binary was built with (a
// pseudo-version naming dex's commit).
func dexVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, m := range info.Deps {
		if m.Path == "github.com/dexidp/dex" {
			if m.Replace != nil {
				return m.Replace.Version
			}
			return m.Version
		}
	}
	return "unknown"
}
