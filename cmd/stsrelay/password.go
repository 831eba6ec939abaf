package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxPassword bounds the line read; bcrypt uses at most 72 bytes.
const maxPassword = 1024

// readPassword reads the password for hash-password: from a terminal with
// a prompt on stderr, twice and without echo, as passwd does; otherwise
// the first line of stdin.
func readPassword(stdin io.Reader, stderr io.Writer) (string, error) {
	f, ok := stdin.(*os.File)
	if !ok {
		return readLine(stdin)
	}
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, getTermios)
	if err != nil {
		return readLine(stdin) // not a terminal: a pipe or a file
	}
	quiet := *old
	quiet.Lflag &^= unix.ECHO
	quiet.Lflag |= unix.ICANON | unix.ISIG
	if err := unix.IoctlSetTermios(fd, setTermios, &quiet); err != nil {
		return "", fmt.Errorf("turning off echo: %w", err)
	}
	// Ctrl-C must not leave the terminal without echo.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	defer func() {
		signal.Stop(sig)
		close(done)
		unix.IoctlSetTermios(fd, setTermios, old)
	}()
	go func() {
		select {
		case <-sig:
			unix.IoctlSetTermios(fd, setTermios, old)
			fmt.Fprintln(stderr)
			os.Exit(130)
		case <-done:
		}
	}()
	r := bufio.NewReader(io.LimitReader(f, 2*maxPassword))
	prompt := func(p string) (string, error) {
		fmt.Fprint(stderr, p)
		line, err := r.ReadString('\n')
		fmt.Fprintln(stderr) // the newline the terminal did not echo
		if err != nil && !errors.Is(err, io.EOF) {
			return "", err
		}
		return strings.TrimRight(line, "\r\n"), nil
	}
	first, err := prompt("Password: ")
	if err != nil || first == "" {
		return first, err
	}
	again, err := prompt("Again: ")
	if err != nil {
		return "", err
	}
	if again != first {
		return "", errors.New("the passwords do not match")
	}
	return first, nil
}

// readLine reads the first line of r.
func readLine(r io.Reader) (string, error) {
	line, err := bufio.NewReader(io.LimitReader(r, maxPassword)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("reading standard input: %w", err)
	}
	return strings.TrimRight(line, "\r\n"), nil
}
