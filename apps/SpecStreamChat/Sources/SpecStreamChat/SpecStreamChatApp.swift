import AppKit
import SwiftUI

@main
struct SpecStreamChatApp: App {
    @NSApplicationDelegateAdaptor(AppDelegate.self) private var appDelegate
    @StateObject private var chat = ChatViewModel()

    var body: some Scene {
        WindowGroup("SpecStream Chat") {
            ChatView(chat: chat)
                .frame(minWidth: 560, minHeight: 440)
        }
    }
}

/// A SwiftPM executable is not an .app bundle: make it a regular foreground app
/// (so its window takes keyboard input) and stop the server when it quits.
final class AppDelegate: NSObject, NSApplicationDelegate {
    func applicationDidFinishLaunching(_ notification: Notification) {
        NSApp.setActivationPolicy(.regular)
        NSApp.activate(ignoringOtherApps: true)
    }

    func applicationShouldTerminateAfterLastWindowClosed(_ sender: NSApplication) -> Bool {
        true
    }

    func applicationWillTerminate(_ notification: Notification) {
        ServerController.shared.stop()
    }
}
